"""Small GGUF files written in the tests, as llama.cpp's converter writes them (no download): the shipped demo
Gemma with its SentencePiece tokenizer, and a tiny Llama 3-layout model with its byte-level BPE tokenizer.

Written with gguf-py's own writer (not the export's code). The Gemma file carries every tensor of the shipped
model under llama.cpp's names (norm weights +1, as the converter stores Gemma's), so llama.cpp runs it; the
Llama 3 file carries the vocabulary, the table and an untied ``output.weight`` for llama.cpp's tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from reserved_kernels.models.artifacts.gguf import PLAN_KEY, TOKEN_TYPES, TOKENS

# llama.cpp's token types (gguf.TokenType): the values SentencePiece uses too
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
Q8_0 = 8  # gguf.GGMLQuantizationType.Q8_0, the type of Gemma 3 270M's table

GEMMA_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _tensor(writer, name: str, values: np.ndarray, ggml_type) -> None:
    import gguf

    if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, gguf.quants.quantize(values, ggml_type))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values, ggml_type), raw_dtype=ggml_type)


def sentencepiece_vocab(path: str) -> tuple[list[str], list[float], list[int]]:
    """(texts, scores, types) of a SentencePiece model as a Gemma GGUF holds them: ``<unusedN>`` typed CONTROL, as
    in Gemma 3's released file (the shipped model has them USER_DEFINED)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    texts = [p.piece for p in proto.pieces]
    types = [CONTROL if p.piece.startswith("<unused") else int(p.type) for p in proto.pieces]
    return texts, [p.score for p in proto.pieces], types


def write_gemma(path: str, model, tokenizer_path: str, *, table_type=None, table: np.ndarray | None = None,
                texts: list[str] | None = None, alignment: int | None = None) -> str:
    """The shipped demo Gemma (``model``, a transformers GemmaForCausalLM) and its tokenizer as a GGUF; its table in
    ``table_type`` (default Q8_0, as in Gemma 3 270M's file), every other matrix F16, the norms F32."""
    import gguf

    table_type = gguf.GGMLQuantizationType.Q8_0 if table_type is None else table_type
    config = model.config
    writer = gguf.GGUFWriter(path, "gemma")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    piece_texts, scores, types = sentencepiece_vocab(tokenizer_path)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(texts if texts is not None else piece_texts)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    weights = state["model.embed_tokens.weight"] if table is None else table
    _tensor(writer, "token_embd.weight", weights, table_type)
    for layer in range(config.num_hidden_layers):
        for hf, name in GEMMA_NAMES.items():
            values = state[f"model.layers.{layer}.{hf}.weight"]
            norm = values.ndim == 1
            _tensor(writer, f"blk.{layer}.{name}.weight", values + 1 if norm else values,
                    gguf.GGMLQuantizationType.F32 if norm else gguf.GGMLQuantizationType.F16)
    _tensor(writer, "output_norm.weight", state["model.norm.weight"] + 1, gguf.GGMLQuantizationType.F32)
    _finish(writer)
    return path


def write_llama3(path: str, tokenizer_json: str, table: torch.Tensor, output: torch.Tensor, *, table_type=None) -> str:
    """A Llama 3-layout GGUF: the byte-level BPE of ``tokenizer_json`` (its reserved special tokens CONTROL, as the
    converter types added special tokens), the table and an untied ``output.weight``."""
    import json

    import gguf

    table_type = gguf.GGMLQuantizationType.F16 if table_type is None else table_type
    with open(tokenizer_json, encoding="utf-8") as f:
        spec = json.load(f)
    texts = [""] * (len(spec["model"]["vocab"]) + len(spec["added_tokens"]))
    types = [NORMAL] * len(texts)
    for text, token_id in spec["model"]["vocab"].items():
        texts[token_id] = text
    for added in spec["added_tokens"]:
        texts[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    vocab_size, dim = table.shape
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(dim)
    writer.add_block_count(0)
    writer.add_feed_forward_length(2 * dim)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(texts + [f"[PAD{i}]" for i in range(len(texts), vocab_size)])
    writer.add_token_types(types + [NORMAL] * (vocab_size - len(texts)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(texts.index("<|begin_of_text|>"))
    writer.add_eos_token_id(texts.index("<|end_of_text|>"))
    _tensor(writer, "token_embd.weight", table.float().numpy(), table_type)
    _tensor(writer, "output.weight", output.float().numpy(), table_type)
    _tensor(writer, "output_norm.weight", np.ones(dim, dtype=np.float32), gguf.GGMLQuantizationType.F32)
    _finish(writer)
    return path


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def with_tensor_type(path: str, out: str, name: str, ggml_type: int) -> str:
    """A copy of the GGUF ``path`` whose tensor ``name`` claims the type ``ggml_type`` (its bytes unchanged), read
    and rewritten with gguf-py's reader: a table of a type the export cannot write."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == name)
    data = bytearray(open(path, "rb").read())
    # the tensor record's type field: 4 bytes before its offset field, which is the record's last 8
    field = tensor.field
    type_offset = int(field.offset) + sum(p.nbytes for p in field.parts) - 8 - 4
    data[type_offset:type_offset + 4] = int(ggml_type).to_bytes(4, "little")
    with open(out, "wb") as f:
        f.write(bytes(data))
    return out


def read(path: str):
    import gguf

    return gguf.GGUFReader(path)


def tensor_bytes(reader, name: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    return np.asarray(tensor.data).view(np.uint8).reshape(int(tensor.shape[-1]), -1)


def assert_only_the_plan_changed(base: str, out: str, plan, rows: dict[str, np.ndarray]) -> None:
    """Read back with gguf-py: the planned tokens renamed and typed USER_DEFINED, the planned rows of each tensor in
    ``rows`` equal to the rows in the tensor's type, and every other token, type, key, tensor and row unchanged."""
    import gguf

    a, b = read(base), read(out)
    ids = plan.ids
    tokens_a, tokens_b = a.fields[TOKENS], b.fields[TOKENS]
    texts_a = [tokens_a.contents(i) for i in range(len(tokens_a.data))]
    texts_b = [tokens_b.contents(i) for i in range(len(tokens_b.data))]
    assert [texts_b[i] for i in ids] == plan.terms
    assert all(texts_a[i] == texts_b[i] for i in range(len(texts_a)) if i not in ids)
    types_a, types_b = a.fields[TOKEN_TYPES].contents(), b.fields[TOKEN_TYPES].contents()
    assert [types_b[i] for i in ids] == [USER_DEFINED] * len(ids)
    assert all(types_a[i] == types_b[i] for i in range(len(types_a)) if i not in ids)
    keys_a = {k for k in a.fields if not k.startswith("GGUF.")}
    assert set(b.fields) - set(a.fields) == {PLAN_KEY}
    for key in keys_a - {TOKENS, TOKEN_TYPES}:
        assert a.fields[key].types == b.fields[key].types
        assert all(np.array_equal(a.fields[key].parts[i], b.fields[key].parts[i]) for i in a.fields[key].data), key
    recorded = json.loads(b.fields[PLAN_KEY].contents())
    assert recorded["tokenizer_sha256"] == plan.tokenizer_sha256
    assert [(e["term"], e["id"], e["piece"]) for e in recorded["entries"]] == [(e.term, e.id, e.piece)
                                                                              for e in plan.entries]
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for tensor in a.tensors:
        before, after = tensor_bytes(a, tensor.name), tensor_bytes(b, tensor.name)
        if tensor.name not in rows:
            assert np.array_equal(before, after), tensor.name
            continue
        others = np.ones(len(before), dtype=bool)
        others[ids] = False
        assert np.array_equal(before[others], after[others]), tensor.name
        expected = gguf.quants.quantize(rows[tensor.name], tensor.tensor_type)
        assert np.array_equal(after[ids], np.ascontiguousarray(expected).view(np.uint8).reshape(len(ids), -1))
    assert b.alignment == a.alignment and b.data_offset % b.alignment == 0


PLACES = ["{t} opens the text", "a line\n{t} at a line start", "after a space {t} here", "after punctuation,{t}",
          "before punctuation {t}, and {t}.", "({t})", "{t}{t} twice"]


def tokenize(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def assert_each_term_is_one_token(llm, plan) -> None:
    """Each term one token wherever it stands (its spaced form's id after a space, its bare form's elsewhere), with
    special=False; detokenising gives the text back."""
    forms = {e.term: e.id for e in plan.entries}
    for term in {t.strip() for t in forms}:
        for place in PLACES:
            text = place.format(t=term)
            expected, start = [], 0
            while (at := text.find(term, start)) >= 0:
                spaced = at > 0 and text[at - 1] == " " and " " + term in forms
                expected.append(forms[" " + term] if spaced else forms[term])
                start = at + len(term)
            ids = tokenize(llm, text)
            assert [i for i in ids if i in forms.values()] == expected, (text, ids)
            assert llm.detokenize(ids).decode("utf-8") == text


def llama_cpp_logits(path: str, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (positions x V) for ``ids`` run through the GGUF at ``path``."""
    import llama_cpp

    llm = llama_cpp.Llama(path, logits_all=True, verbose=False, n_ctx=max(64, len(ids)), n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def through_the_table_type(model, ggml_type) -> None:
    """The patched ``model``'s rows replaced by what the GGUF holds: each put through ``ggml_type`` and back."""
    import gguf

    from reserved_kernels.models.layout import input_embedding, output_head

    for module in {id(m): m for m in (input_embedding(model), output_head(model))}.values():
        rows = getattr(module, "reserved_weight", None)
        if rows is not None:
            data = gguf.quants.quantize(rows.float().numpy(), ggml_type)
            rows.copy_(torch.from_numpy(gguf.quants.dequantize(data, ggml_type)))


def assert_logits_agree(plain, patched, base: str, out: str, ordinary: list[int], with_terms: list[int],
                        table_type) -> tuple[float, float]:
    """llama.cpp's logits on the export agree with the patched model's (its rows put through the table's type) on
    ids with the terms as well as llama.cpp and PyTorch agree on the base file and ordinary text.

    The allowance is derived, not guessed: twice the largest logit difference of that baseline (llama.cpp computes
    with quantised weights and activations, PyTorch with their fp32 dequantisation: the same gap, whatever the
    rows). The check can fail: the base file (the slots' old rows) on the same ids must miss it. Returns (baseline,
    difference)."""
    baseline = float(np.abs(llama_cpp_logits(base, ordinary) - torch_logits(plain, ordinary)).max())
    through_the_table_type(patched, table_type)
    expected = torch_logits(patched, with_terms)
    difference = float(np.abs(llama_cpp_logits(out, with_terms) - expected).max())
    assert difference <= 2 * baseline, (difference, baseline)
    stale = float(np.abs(llama_cpp_logits(base, with_terms) - expected).max())
    assert stale > 2 * baseline, (stale, baseline)  # without the rows written, the same check fails
    return baseline, difference
