"""The web chat page at / in a real headless Chromium (Debian's package, driven by Playwright): type a message,
see the answer stream in, talk a second turn, stop a long answer. Skipped where no Chromium is installed
(`.ci/run` installs it on CI)."""

import json
import shutil
from pathlib import Path

import pytest

from tests.test_serve import start_server, stop_server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


pytestmark = pytest.mark.skipif(chromium() is None, reason="no Chromium here (apt-get install chromium)")


@pytest.fixture(scope="module")
def page_url(chat_checkpoint, tmp_path_factory):
    model = tmp_path_factory.mktemp("browser") / "model"
    model.mkdir()
    for f in Path(chat_checkpoint["model"]).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # room for a long answer to stop
    (model / "config.json").write_text(json.dumps(config))
    proc, url = start_server(model)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_chat_page_streams_answers_and_stops(browser, page_url):
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions")
            else None)
    page.goto(page_url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    # count the page's updates of the log while the answer streams in
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#max_tokens", "40")

    def forty_tokens(route):  # a seeded answer that does not stop early: a sampled one once ended after 4 updates
        body = {**json.loads(route.request.post_data), "seed": 1, "ignore_eos": True}
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", forty_tokens)
    page.fill("#input", "这条评论是好评还是差评？质量很好")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant[data-done='1']", timeout=60_000)
    page.unroute("**/v1/chat/completions", forty_tokens)
    answer = page.inner_text(".assistant .content")
    assert answer.strip(), "no answer appeared"
    assert page.evaluate("window.updates") > 5  # it arrived in pieces, not at once
    assert page.inner_text(".user") == "这条评论是好评还是差评？质量很好"

    page.fill("#input", "为什么？")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant:nth-of-type(4)[data-done='1']", timeout=60_000)
    assert [m["role"] for m in requests[-1]["messages"]] == ["user", "assistant", "user"]
    assert requests[-1]["stream"] is True

    def no_early_stop(route):  # a sampled answer can end on its own before the click: CI once saw that
        route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True}))

    page.route("**/v1/chat/completions", no_early_stop)
    page.fill("#max_tokens", "3500")
    page.fill("#input", "写一篇很长的评论")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.assistant .content')[2].textContent.length > 0")
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_selector(".assistant:nth-of-type(6)[data-done='1']", timeout=30_000)
    assert "(stopped)" in page.inner_text(".assistant:nth-of-type(6)")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    page.close()


def test_think_block_is_shown_apart_and_folds(browser, page_url):
    """A reasoning model's answer (a canned stream: the tiny random model does not think) puts the reasoning in a
    collapsible block, folded once the answer begins."""
    chunks = [{"role": "assistant", "content": ""}, {"reasoning_content": "先看评论"},
              {"reasoning_content": "：质量很好。"}, {"content": "好"}, {"content": "评"}]
    body = "".join("data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                          "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) + "\n\n"
                   for d in chunks) + "data: [DONE]\n\n"
    page = browser.new_page()
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    page.goto(page_url + "/")
    page.fill("#input", "好评还是差评？")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant[data-done='1']", timeout=30_000)
    assert page.inner_text(".assistant .content") == "好评"
    assert page.is_visible(".assistant details summary")
    assert page.evaluate("document.querySelector('.assistant details').open") is False  # folded
    page.click(".assistant details summary")
    assert page.inner_text(".assistant .reasoning") == "先看评论：质量很好。"
    page.close()


def test_model_picker_sends_the_model_picked(browser, page_url):
    """Several models served (a canned /v1/models): the page lists them (a LoRA adapter with its base), hides the
    list for one, and the next message goes to the model picked."""
    models = {"object": "list", "data": [{"id": "sft", "object": "model", "max_model_len": 512},
                                         {"id": "dpo", "object": "model", "max_model_len": 1024},
                                         {"id": "verdict", "object": "model", "max_model_len": 512, "parent": "sft"}]}
    body = "".join("data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "dpo",
                                          "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) + "\n\n"
                   for d in [{"role": "assistant", "content": ""}, {"content": "好"}]) + "data: [DONE]\n\n"
    sent = []

    def answer(route):
        sent.append(json.loads(route.request.post_data)["model"])
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page = browser.new_page()
    page.goto(page_url + "/")  # the real server: one model, no list
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    assert page.evaluate("document.getElementById('models').hidden") is True
    page.route("**/v1/models", lambda route: route.fulfill(status=200, json=models))
    page.route("**/v1/chat/completions", answer)
    page.reload()
    page.wait_for_function("!document.getElementById('models').hidden")
    assert page.eval_on_selector_all("#models option", "options => options.map(o => o.value)") == \
        ["sft", "dpo", "verdict"]
    assert page.text_content("#models option:nth-child(3)") == "verdict (LoRA of sft)"  # an adapter names its base
    page.select_option("#models", "dpo")
    assert page.inner_text("#model") == "context 1024"
    page.fill("#input", "你好")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant[data-done='1']", timeout=30_000)
    assert sent == ["dpo"] and page.inner_text(".assistant .content") == "好"
    page.close()
