"""LoRA, written by hand: attach low-rank adapters to named Linear layers, save / load them in PEFT's layout, merge.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a weight W [out, in] and learns
a low-rank update: y = x W^T + dropout(x) A^T B^T * (alpha / r), with A [r, in] and B [out, r]. B starts at zero, so
the adapted model starts out exactly equal to the base model, and only r * (in + out) numbers per layer are trained.

A wrapped layer keeps the base layer's `weight` (and `bias`) under their original names, so the model's own keys
(`model.layers.0.self_attn.q_proj.weight`) are unchanged; the adapter adds `...q_proj.lora_A.weight` and
`...q_proj.lora_B.weight`. On disk the adapter keys carry PEFT's prefix `base_model.model.`, and `adapter_config.json`
holds PEFT's LoraConfig fields, so `peft.PeftModel.from_pretrained(LlamaForCausalLM..., adapter_dir)` loads our
adapters and `load_lora` loads PEFT's.
"""

import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dataset.io import atomic_path, atomic_write_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A mixture-of-experts model's expert projections (Mixtral's names; the router, `gate`, is left alone). PEFT loads
# adapters on them onto a Mixtral whose experts are modules (transformers 4); transformers 5 keeps its experts as
# fused tensors, where PEFT applies only the attention adapters.
EXPERT_TARGETS = ("w1", "w2", "w3")


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update B @ A scaled by alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        # The base parameters are taken over as they are (same tensors), so their names and storage do not change.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        # PEFT's default init: A like nn.Linear (kaiming-uniform, a=sqrt(5)), B zero, so B @ A = 0 at the start.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged_linear(self) -> nn.Linear:
        """A plain Linear whose weight is W + B @ A * scaling (computed in fp32), reusing this layer's tensors."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        with torch.no_grad():
            self.weight.add_(delta.to(self.weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout_p}")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """What B @ A is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), so that the
    update's size does not shrink as r grows."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`), whose names PEFT expects."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _is_target(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's matching rule: a regex must match the whole module name; a list entry must equal its last part(s)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by module path (e.g. `model.layers.0.self_attn.q_proj`)."""
    return {name: module for name, module in _unwrap(model).named_modules() if isinstance(module, LoRALinear)}


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Iterable[str] = DEFAULT_TARGETS,
    use_rslora: bool = False,
) -> nn.Module:
    """Wrap each Linear named by `target_modules` in a LoRALinear, in place, and freeze every non-LoRA parameter.

    `target_modules` is a list of module-name suffixes (`"q_proj"`) or one regex over the full module path, as in PEFT.
    """
    bare = _unwrap(model)
    if lora_layers(bare):
        raise ValueError("model already has LoRA layers; merge_lora() first, or load the adapter into a fresh model")
    if not isinstance(target_modules, str):
        target_modules = tuple(target_modules)
    targets = [name for name, module in bare.named_modules()
               if isinstance(module, nn.Linear) and _is_target(name, target_modules)]
    if not targets:
        raise ValueError(f"no Linear layer matches target_modules={target_modules!r}")
    for param in bare.parameters():
        param.requires_grad_(False)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = bare.get_submodule(parent_name)
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), r, alpha, dropout, use_rslora))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (every lora_A / lora_B weight): what the optimizer should train."""
    return [param for layer in lora_layers(model).values() for param in (layer.lora_A.weight, layer.lora_B.weight)]


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, e.g. for `LoRA: 0.29M trainable of 7.1M (4.1%)`."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_lora(model: nn.Module, out_dir: str | os.PathLike, base_model_path: str | None = None) -> None:
    """Write the adapter as PEFT does: `adapter_model.safetensors` (PEFT key names) and `adapter_config.json`."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save; call apply_lora() first")
    settings = {(layer.r, layer.alpha, layer.dropout_p, layer.use_rslora) for layer in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers differ in (r, alpha, dropout, use_rslora): {sorted(settings)}; "
                         "adapter_config.json can hold only one setting")
    (r, alpha, dropout, use_rslora), = settings
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rpartition(".")[2] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / ADAPTER_CONFIG, config)


def _check_supported(config: dict, path: Path) -> None:
    """Refuse PEFT options this LoRA does not implement, rather than load something that computes differently."""
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "exclude_modules": bool(config.get("exclude_modules")),
        "target_parameters": bool(config.get("target_parameters")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
        "layer_replication": bool(config.get("layer_replication")),
    }
    for field, is_set in unsupported.items():
        if is_set:
            raise ValueError(f"{path}: {field}={config[field]!r} is not supported by model/lora.py")


def read_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, ...]]]:
    """An adapter directory (ours or PEFT's) checked against `model`: its adapter_config.json, and per adapted
    module path its (lora_A [r, in], lora_B [out, r]) weights. Keys that do not match the model's Linear layers,
    or shapes that do not fit them, raise with the file named."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not JSON: {exc}") from exc
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise ValueError(f"{config_path}: no {', '.join(missing)}")
    _check_supported(config, config_path)
    targets = config["target_modules"]
    targets = targets if isinstance(targets, str) else tuple(targets)
    layers = {name: module for name, module in _unwrap(model).named_modules()
              if isinstance(module, (nn.Linear, StackedLoRALinear)) and _is_target(name, targets)}
    if not layers:
        raise ValueError(f"{config_path}: no Linear layer matches target_modules={targets!r}")
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    saved = load_file(str(weights_path))
    r = config["r"]
    expected = {}
    for name, layer in layers.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (layer.out_features, r)
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(f"{weights_path}: adapter keys do not match the model: "
                       f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(saved[key].shape) != shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(saved[key].shape)}, the model needs {shape}")
    return config, {name: (saved[f"{PEFT_PREFIX}{name}.lora_A.weight"], saved[f"{PEFT_PREFIX}{name}.lora_B.weight"])
                    for name in layers}


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Apply LoRA as `adapter_config.json` describes and load its weights strictly (ours or PEFT's); returns model."""
    config, weights = read_adapter(model, adapter_dir)
    apply_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
               target_modules=config["target_modules"], use_rslora=bool(config.get("use_rslora")))
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(weights[name][0])
            layer.lora_B.weight.copy_(weights[name][1])
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and put plain Linear layers back; all parameters trainable again.

    The merged model has exactly the base model's parameter names, so it saves as a plain Llama checkpoint.
    """
    bare = _unwrap(model)
    layers = lora_layers(bare)
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    for name, layer in layers.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(bare.get_submodule(parent_name), child_name, layer.merged_linear())
    for param in bare.parameters():
        param.requires_grad_(True)
    return model


@dataclass
class StackedAdapter:
    """One adapter as AdapterRows stacks it: its name, rank, scaling and per module path (lora_A, lora_B)."""

    name: str
    r: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


class AdapterRows:
    """LoRA adapters stacked unmerged on a model (serving adapters next to their base, as vLLM's --lora-modules
    does), and which adapter each row of the model's next forward pass uses.

    Each adapter has an id, 1, 2, ... in the order added and never reused (0 is the base). `select(ids)` before a
    pass: ids[i] is row i's adapter. `add` and `remove` change the stacks between passes; removing an adapter does
    not change the others' ids. The adapters may differ in rank, alpha, scaling rule and target modules."""

    def __init__(self, model: nn.Module):
        self.model = _unwrap(model)
        if lora_layers(self.model) or any(isinstance(m, StackedLoRALinear) for m in self.model.modules()):
            raise ValueError("model already has LoRA layers")
        self.adapters: dict[int, StackedAdapter] = {}  # by id, in the order of their blocks in the stacks
        self.rank = 0  # every adapter's block is this wide: the largest rank, smaller ones padded with zeros
        self._next_id = 1
        self.active = False  # some row uses an adapter
        self.single: slice | None = None  # every row uses this one adapter: its block of the stacked ranks
        self.mask: torch.Tensor | None = None  # rows that differ: (rows, 1, adapters * rank), 1 over the row's block

    @property
    def names(self) -> dict[int, str]:
        return {i: adapter.name for i, adapter in self.adapters.items()}

    def read(self, name: str, adapter_dir: str | os.PathLike) -> StackedAdapter:
        """An adapter directory checked against the model as load_lora checks it (it changes nothing: a caller may
        read off the thread that runs the model, then `add` on it)."""
        config, weights = read_adapter(self.model, adapter_dir)
        r = config["r"]
        return StackedAdapter(name, r, lora_scaling(r, config["lora_alpha"], bool(config.get("use_rslora"))), weights)

    def add(self, adapter: StackedAdapter) -> int:
        """Stack an adapter (from `read`); returns its id."""
        adapter_id, self._next_id = self._next_id, self._next_id + 1
        self.adapters[adapter_id] = adapter
        self._restack()
        return adapter_id

    def remove(self, adapter_id: int) -> None:
        del self.adapters[adapter_id]
        self._restack()

    def _restack(self) -> None:
        """Rebuild every adapted layer's stacks from self.adapters; a layer first targeted becomes stacked."""
        adapters = list(self.adapters.values())
        self.rank = max((adapter.r for adapter in adapters), default=0)
        stacked = {name for name, m in self.model.named_modules() if isinstance(m, StackedLoRALinear)}
        for name in sorted(stacked.union(*(adapter.weights for adapter in adapters))):
            layer = self.model.get_submodule(name)
            if not isinstance(layer, StackedLoRALinear):
                parent_name, _, child_name = name.rpartition(".")
                layer = StackedLoRALinear(layer, self)
                setattr(self.model.get_submodule(parent_name), child_name, layer)
            factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
            lora_A = torch.zeros(len(adapters) * self.rank, layer.in_features, **factory)
            lora_B = torch.zeros(layer.out_features, len(adapters) * self.rank, **factory)
            for i, adapter in enumerate(adapters):
                if name in adapter.weights:
                    start = i * self.rank
                    lora_A[start:start + adapter.r] = adapter.weights[name][0]
                    lora_B[:, start:start + adapter.r] = adapter.weights[name][1].float() * adapter.scaling
            layer.lora_A, layer.lora_B = lora_A, lora_B

    def select(self, ids: list[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        blocks = {adapter_id: block for block, adapter_id in enumerate(self.adapters, start=1)} | {0: 0}
        if not all(i in blocks for i in ids):
            raise ValueError(f"adapter ids {ids}: this model has {sorted(self.adapters)} (0: none)")
        self.active, self.single, self.mask = any(ids), None, None
        if self.active and len(set(ids)) == 1:
            block = blocks[ids[0]]
            self.single = slice((block - 1) * self.rank, block * self.rank)
        elif self.active:
            mask = torch.zeros(len(ids), len(self.adapters) + 1, self.rank, dtype=dtype)
            mask[torch.arange(len(ids)), torch.tensor([blocks[i] for i in ids])] = 1
            self.mask = mask[:, 1:].reshape(len(ids), 1, -1).to(device)


class StackedLoRALinear(nn.Module):
    """A frozen Linear and several LoRA adapters side by side, unmerged, so that one batch can mix them.
    lora_A [adapters * r, in] and lora_B [out, adapters * r] stack the adapters' A and B (AdapterRows builds them),
    B scaled by its adapter's alpha / r; a smaller rank is padded with zeros, which add nothing, and so is an
    adapter that leaves this layer alone. A batch whose rows differ projects every row on every adapter's A, keeps
    each row's own block (AdapterRows.mask; a base row keeps none) and adds the B of what it kept."""

    def __init__(self, base: nn.Linear, rows: AdapterRows):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base layer's own tensors, under their own names
        self.register_buffer("lora_A", None)
        self.register_buffer("lora_B", None)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        rows = self.rows
        if not rows.active:
            return y
        if rows.single is not None:
            return y + F.linear(F.linear(x, self.lora_A[rows.single]), self.lora_B[:, rows.single])
        return y + F.linear(F.linear(x, self.lora_A) * rows.mask, self.lora_B)


def stack_adapters(model: nn.Module, adapters: dict[str, str | os.PathLike]) -> AdapterRows:
    """Attach the adapters {name: directory} to `model` unmerged, in place; returns the AdapterRows whose
    `select(ids)` picks each row's adapter (1 for the first name, ...)."""
    rows = AdapterRows(model)
    for name, directory in adapters.items():
        rows.add(rows.read(name, directory))
    return rows


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def merge_adapter(init_from: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  model_class=None) -> Path:
    """Load the base with `model_class.from_pretrained` (default: our LM), merge the adapter, save into out_dir.

    Tokenizer and generation files come from the adapter directory where it has them, else from the base.
    """
    if model_class is None:
        from .model import LM
        model_class = LM
    model = model_class.from_pretrained(init_from)
    merge_lora(load_lora(model, adapter_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Write everything into a sibling temp directory, then rename file by file: no half-written file in out_dir.
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        model.save_pretrained(staging)
        for name in TOKENIZER_FILES:
            source = next((Path(d) / name for d in (adapter_dir, init_from) if (Path(d) / name).is_file()), None)
            if source is not None:
                shutil.copyfile(source, staging / name)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
