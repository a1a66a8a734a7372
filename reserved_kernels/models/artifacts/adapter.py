"""The trained rows as a PEFT trainable-tokens adapter: the format people share and serve.

A folder that ``peft.PeftModel.from_pretrained(base_model, folder)`` loads without reserved_kernels installed:

* ``adapter_config.json``: ``peft_type: TRAINABLE_TOKENS``, ``token_indices`` (the reserved ids, in slot order)
  and ``target_modules`` (the embedding's name, and an untied head's);
* ``adapter_model.safetensors``: ``base_model.model.<embedding>.trainable_tokens_delta`` (K×D, the rows as
  trained: float32 master rows of a 16-bit model are kept, and PEFT rounds them to the table's dtype as our
  forward does) and, for a tied head, the same rows under ``base_model.model.<head>.trainable_tokens_delta``,
  as PEFT writes them (an untied head's key holds its own rows). The file's metadata records the table's shape
  and the plan's tokenizer hash, which :func:`read_adapter` checks; PEFT ignores them.

Beside them the plan (``reserved_plan.json``) and, given the :class:`~reserved_kernels.ReservedVocab`, the planned
tokenizer. No pickle anywhere. :func:`read_adapter` reads such a folder, or one PEFT wrote.
"""

from __future__ import annotations

import json
import os
import warnings

from torch import Tensor, nn

from reserved_kernels._io import atomic_write_many
from reserved_kernels.models.artifacts.rows import ReservedRows
from reserved_kernels.models.layout import base_model, input_embedding, output_head
from reserved_kernels.models.state import patch_state
from reserved_kernels.vocab.planning import PLAN_FILENAME, ReservedPlan

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
KEY_SUFFIX = ".trainable_tokens_delta"
PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's modules
TABLE_KEY, TOKENIZER_KEY = "reserved_kernels.table", "reserved_kernels.tokenizer_sha256"


class AdapterError(ValueError):
    """A PEFT adapter folder that cannot be read onto this model; the message names the file and the key."""


def _module_names(model: nn.Module) -> tuple[str, str | None, bool]:
    """(the embedding's name, the head's name or None, whether the head is untied) inside the transformers model."""
    base = base_model(model)
    names = {id(m): n for n, m in base.named_modules()}
    head, embedding = output_head(model), input_embedding(model)
    untied = head is not None and head.weight is not embedding.weight  # patched or not: a tied head shares it
    return names[id(embedding)], names.get(id(head)) if head is not None else None, untied


def write_adapter(model: nn.Module, folder: str, plan=None, vocab=None) -> None:
    """Write a patched ``model``'s rows as a PEFT trainable-tokens adapter into ``folder`` (see the module), with
    ``plan`` (a :class:`~reserved_kernels.ReservedPlan`) or ``vocab`` (its planned tokenizer too) beside them."""
    from safetensors.torch import save

    config_path = os.path.join(folder, CONFIG_NAME)
    if os.path.exists(config_path):  # never overwrite another adapter (a LoRA saved there) with ours
        with open(config_path, encoding="utf-8") as f:
            kind = json.load(f).get("peft_type")
        if kind != "TRAINABLE_TOKENS":
            raise ValueError(f"{config_path} holds a {kind} adapter: save the rows to a folder of their own")
    embedding = input_embedding(model)
    head = output_head(model)
    embedding_name, head_name, untied = _module_names(model)
    rows = embedding.reserved_weight.detach().cpu().contiguous()
    tensors = {PREFIX + embedding_name + KEY_SUFFIX: rows}
    if head_name is not None:  # tied: PEFT keeps the tied head's copy of the rows under its own key
        tensors[PREFIX + head_name + KEY_SUFFIX] = head.reserved_weight.detach().cpu().contiguous() if untied else rows
    base = base_model(model)
    metadata = {"format": "pt", TABLE_KEY: "x".join(map(str, embedding.weight.shape))}
    if plan is not None:
        metadata[TOKENIZER_KEY] = plan.tokenizer_sha256
    config = {"peft_type": "TRAINABLE_TOKENS", "task_type": None, "inference_mode": True,
              "token_indices": embedding.reserved_ids.tolist(),
              "target_modules": [name.rsplit(".", 1)[-1]
                                 for name in [embedding_name] + ([head_name] if untied else [])],
              "init_weights": True, "base_model_name_or_path": getattr(getattr(base, "config", None), "_name_or_path",
                                                                         None) or None, "revision": None}
    if hasattr(base, "config"):
        config["auto_mapping"] = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    files = {os.path.join(folder, WEIGHTS_NAME): save({k: v.clone() for k, v in tensors.items()}, metadata=metadata),
             config_path: (json.dumps(config, indent=2) + "\n").encode("utf-8")}
    if plan is not None and vocab is None:
        files[os.path.join(folder, PLAN_FILENAME)] = plan.to_json().encode("utf-8")
    os.makedirs(folder, exist_ok=True)
    atomic_write_many(files)
    if vocab is not None:
        vocab.save(folder)


def is_adapter_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_NAME))


def read_config(folder: str) -> tuple[str, list[int]]:
    """(the config's path, its ``token_indices``) of a PEFT trainable-tokens adapter folder, without a model:
    :class:`AdapterError` naming the file and the key for an unreadable config, another adapter type, or indices
    that are not a non-empty list of ids."""
    config_path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path}: not a readable JSON adapter config ({exc})") from None
    if config.get("peft_type") != "TRAINABLE_TOKENS":
        raise AdapterError(f"{config_path}: key 'peft_type' is {config.get('peft_type')!r}, not 'TRAINABLE_TOKENS': "
                           "load other adapters (LoRA ...) with peft.PeftModel.from_pretrained")
    indices = config.get("token_indices")
    if isinstance(indices, dict):  # PEFT's per-module form {"embed_tokens": [...]}
        indices = next(iter(indices.values()), None)
    if not (isinstance(indices, list) and indices and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in indices)):
        raise AdapterError(f"{config_path}: key 'token_indices' must be a non-empty list of ids, got {indices!r}")
    return config_path, indices


def read_adapter(folder: str, model: nn.Module, vocab=None) -> ReservedRows:
    """The :class:`~.rows.ReservedRows` of a PEFT trainable-tokens adapter folder
    (ours or PEFT's), checked against ``model`` (patched or not): :class:`AdapterError` naming the file and the key
    for indices out of range, rows of the wrong shape, or another base model (the table's shape, the plan's
    tokenizer); a warning for indices that are not reserved slots of ``vocab`` (by default the one the model was
    patched with)."""
    from safetensors import safe_open

    config_path, indices = read_config(folder)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    vocab_size, dim = input_embedding(model).weight.shape
    bad = [i for i in indices if not 0 <= i < vocab_size]
    if bad:
        raise AdapterError(f"{config_path}: key 'token_indices' holds {bad[:5]}, outside this model's "
                           f"{vocab_size:,} rows")
    if len(set(indices)) != len(indices):
        raise AdapterError(f"{config_path}: key 'token_indices' repeats an id")
    embedding_name, head_name, untied = _module_names(model)
    wanted = {"embedding": embedding_name, "head": head_name}
    if not os.path.exists(weights_path):
        raise AdapterError(f"{weights_path}: missing (only safetensors adapters are read)")
    found: dict[str, Tensor] = {}
    with safe_open(weights_path, framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            for role, name in wanted.items():
                # PEFT's prefix, or any other (an adapter saved around a wrapper): the module's own name decides
                if name is not None and (key.endswith("." + name + KEY_SUFFIX) or key == name + KEY_SUFFIX):
                    found[role] = (key, f.get_tensor(key))
    if "embedding" not in found:
        raise AdapterError(f"{weights_path}: no key '{PREFIX}{embedding_name}{KEY_SUFFIX}' (this model's embedding)")
    shape = metadata.get(TABLE_KEY)
    if shape is not None and shape != f"{vocab_size}x{dim}":
        raise AdapterError(f"{weights_path}: metadata key {TABLE_KEY!r} says a {shape} table; this model's is "
                           f"{vocab_size}x{dim} (another base model)")
    for key, rows in found.values():
        if rows.shape != (len(indices), dim):
            raise AdapterError(f"{weights_path}: key {key!r} holds rows of shape {tuple(rows.shape)}, expected "
                               f"({len(indices)}, {dim}) for {len(indices)} token_indices of width {dim}")
    plan = None
    plan_path = os.path.join(folder, PLAN_FILENAME)
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            plan = ReservedPlan.from_json(f.read())[0]
    state = patch_state(model)
    vocab = vocab if vocab is not None else (state.vocab if state is not None else None)
    sha = metadata.get(TOKENIZER_KEY) or (plan.tokenizer_sha256 if plan is not None else None)
    if vocab is not None and sha is not None and sha != vocab.sha256:
        raise AdapterError(f"{weights_path}: metadata key {TOKENIZER_KEY!r} ({sha[:12]}…) is not this model's "
                           f"tokenizer ({vocab.sha256[:12]}…): the adapter was planned for another tokenizer")
    if vocab is not None and not set(indices) <= set(vocab.reserved_ids):
        warnings.warn(f"{config_path}: token_indices {sorted(set(indices) - set(vocab.reserved_ids))[:5]} are not "
                      "reserved slots of the tokenizer; the rows load as given", UserWarning, stacklevel=4)
    head_rows = found["head"][1] if untied and "head" in found else None
    return ReservedRows(ids=list(indices), rows=found["embedding"][1], head_rows=head_rows, plan=plan,
                        table_shape=(vocab_size, dim) if shape is not None else None, source=folder)
