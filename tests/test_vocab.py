"""Reserved-slot planning on the embedded SentencePiece tokenizer and on a tokenizer.json."""

from __future__ import annotations

import json
import os

import pytest
import sentencepiece as spm

import reserved_kernels as rk
from reserved_kernels.cli import main as cli_main
from reserved_kernels.vocab import PlanError, ReservedPlan, ReservedVocab, default_tokenizer_path

SAMPLE = "The model trains every row, then stops. Le réseau mesure 4096 tokens; 東京 data — twice!\n"
TERMS = {"[summary]": "a short summary of the text", "machine learning": None, "東京タワー": "the tower in Tokyo",
         "café-crème": "a coffee with cream", "🚀": "rocket launch"}


@pytest.fixture
def vocab() -> ReservedVocab:
    return ReservedVocab.from_file(default_tokenizer_path())


def test_embedded_tokenizer_has_gemma_layout(vocab):
    pieces = [vocab.piece(i) for i in range(8)]
    assert pieces == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<2mass>", "[@BOS@]", "<unused0>"]
    assert vocab.reserved_ids == list(range(7, 106))
    assert vocab.piece(106) == "<start_of_turn>" and vocab.piece(107) == "<end_of_turn>"
    assert vocab.piece(108) == "<0x00>" and vocab.free_ids == vocab.reserved_ids


def test_round_trip_of_every_term_and_other_ids_unchanged(vocab, tmp_path):
    plan = vocab.assign(TERMS)
    assert plan.ids == list(range(7, 7 + 2 * len(TERMS)))  # each term and its spaced form
    assert plan.terms == [form for term in TERMS for form in (" " + term, term)]  # the spaced form first (Ollama)
    tok_path, plan_path = vocab.save(tmp_path)
    renamed = spm.SentencePieceProcessor(model_file=tok_path)
    original = spm.SentencePieceProcessor(model_file=default_tokenizer_path())
    assert renamed.vocab_size() == original.vocab_size()
    for entry in plan.entries:
        assert renamed.encode(entry.term) == [entry.id]
        assert renamed.decode([entry.id]) in (entry.term, entry.term.lstrip())  # a first piece's space is dropped
        text = f"Before{entry.term} after."
        assert entry.id in renamed.encode(text) and renamed.decode(renamed.encode(text)) == text
    assert renamed.encode(SAMPLE) == original.encode(SAMPLE)
    for i in range(renamed.vocab_size()):
        if i not in plan.ids:
            assert renamed.id_to_piece(i) == original.id_to_piece(i)
    saved = json.loads(open(plan_path, encoding="utf-8").read())
    assert saved["format_version"] == 1 and saved["tokenizer_sha256"] == vocab.sha256
    assert [e["term"] for e in saved["entries"]] == plan.terms


def test_sources_come_from_the_original_tokenizer_without_special_ids(vocab):
    plan = vocab.assign({"[summary]": "a short summary", "<unused5> only": None})
    summary = plan["[summary]"]
    assert summary.source_ids == tuple(vocab.encode("a short summary"))
    assert plan[" [summary]"].source_ids == tuple(vocab.encode(" a short summary"))  # the in-sentence pieces
    assert all(i not in vocab.reserved_ids and i > 107 for e in plan.entries for i in e.source_ids)
    offsets, ids = plan.sources_csr()
    assert offsets.tolist()[0] == 0 and offsets.tolist()[-1] == ids.numel()


def test_sources_initialise_reserved_embedding_rows(vocab):
    plan = vocab.assign(TERMS)
    emb = rk.ReservedEmbedding(vocab.vocab_size, 8, reserved_ids=vocab.reserved_ids)
    merged = emb.merged_weight()
    emb.init_reserved_(plan.sources_csr(), targets=plan.ids)
    row = emb.reserved_weight[emb.reserved_ids.tolist().index(plan["[summary]"].id)].detach()
    expected = merged[list(plan["[summary]"].source_ids)].mean(0)
    assert (row - expected).abs().max() < 1e-6


def test_assign_is_idempotent(vocab):
    first = vocab.assign(["[summary]", "[translate]"])
    again = vocab.assign({"[translate]": "ignored: already planned", " [summary] ": None})
    assert again == first and len(vocab.free_ids) == 95
    more = vocab.assign(["[summary]", "[qa]"])
    assert more.ids == [7, 8, 9, 10, 11, 12]


def test_exhaustion_is_refused_and_changes_nothing(vocab):
    vocab.assign(["[a]"])
    before = vocab.plan
    with pytest.raises(PlanError, match=r"98 new slots asked for \(' \[term0\]', '\[term0\]'.* but only 97 reserved "):
        vocab.assign([f"[term{i}]" for i in range(49)])
    assert vocab.plan is before


@pytest.mark.parametrize("bad, match", [("", "non-empty"), ("   ", "non-empty"), ("\t\n", "non-empty"),
                                        ("▁the", r"'▁the' is the piece '▁the' \(id 369\)"),
                                        ("<unused3>", r"'<unused3>' is the piece '<unused3>' \(id 10\)")])
def test_bad_terms_are_refused(vocab, bad, match):
    with pytest.raises(PlanError, match=match):
        vocab.assign([bad])
    assert len(vocab.plan) == 0


def test_term_without_sources_is_reported(vocab):
    with pytest.raises(PlanError, match="no initialisation sources"):
        vocab.assign({"[x]": "<unused4><unused5>"})
    assert len(vocab.plan) == 0


def test_plan_reloads_and_checks_the_tokenizer(vocab, tmp_path):
    vocab.assign(TERMS)
    tok_path, plan_path = vocab.save(tmp_path)
    again = ReservedVocab.from_file(default_tokenizer_path(), plan=tmp_path)
    assert again.plan == vocab.plan and again.free_ids == vocab.free_ids
    with pytest.raises(PlanError, match="renamed tokenizer this plan wrote"):
        ReservedVocab.from_file(tok_path, plan=plan_path)
    other = tmp_path / "other.model"  # a different tokenizer file: one more slot renamed
    other.write_bytes(vocab.backend.renamed({vocab.reserved_ids[-1]: "[zz]"}))
    with pytest.raises(PlanError, match="another tokenizer"):
        ReservedVocab.from_file(other, plan=plan_path)


@pytest.mark.parametrize("content, match", [("not json", "corrupt"), ('{"format_version": 99}', "format_version"),
                                            ('{"format_version": 1, "entries": []}', "corrupt")])
def test_corrupt_plan_files_are_refused(tmp_path, content, match):
    path = tmp_path / "reserved_plan.json"
    path.write_text(content)
    with pytest.raises(PlanError, match=match):
        ReservedVocab.from_file(default_tokenizer_path(), plan=path)


def test_interrupted_save_leaves_old_files_intact(vocab, tmp_path, monkeypatch):
    vocab.assign(["[one]"])
    vocab.save(tmp_path)
    old = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    vocab.assign(["[two]"])
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second file is half-written when the "crash" comes
            raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        vocab.save(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == old


def test_tokenizer_json_round_trip(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json support needs the tokenizers package")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<unused{i}>" for i in range(5)]
    tok.train_from_iterator([SAMPLE] * 50, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    src = tmp_path / "src" / "tokenizer.json"
    src.parent.mkdir()
    tok.save(str(src))
    vocab = ReservedVocab.from_file(src)
    assert vocab.reserved_ids == list(range(4, 9))
    plan = vocab.assign({"[summary]": "The model", "東京タワー": "data"})
    tok_path, _ = vocab.save(tmp_path / "out")
    renamed = tokenizers.Tokenizer.from_file(tok_path)
    for entry in plan.entries:
        assert renamed.encode(entry.term, add_special_tokens=False).ids == [entry.id]
        assert renamed.decode([entry.id]) in (entry.term, entry.term.lstrip())
    assert renamed.get_vocab_size() == tok.get_vocab_size()
    assert renamed.encode(SAMPLE).ids == tok.encode(SAMPLE).ids
    assert all(i not in vocab.reserved_ids for e in plan.entries for i in e.source_ids)


def test_cli_plan_prints_the_table(tmp_path, capsys):
    terms = tmp_path / "terms.txt"
    terms.write_text("[summary]\ta short summary of the text\n# comment\n\nmachine learning\n", encoding="utf-8")
    cli_main(["plan", "--terms", str(terms), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "[summary]" in out and "<unused0>" in out and "▁summary" in out and "95 of 99" in out
    assert (tmp_path / "out" / "tokenizer.model").exists()


def test_cli_plan_reports_errors_cleanly(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("".join(f"[t{i}]\n" for i in range(50)))
    with pytest.raises(SystemExit, match="only 99 reserved slots are free"):
        cli_main(["plan", "--terms", str(terms), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_renamed_encoder_matches_the_saved_tokenizer(vocab, tmp_path):
    vocab.assign(TERMS)
    tok_path, _ = vocab.save(tmp_path)
    text = "Make a [summary] of machine learning in 東京タワー 🚀"
    assert vocab.renamed_encoder()(text) == spm.SentencePieceProcessor(model_file=tok_path).encode(text)


def test_shipped_tokenizer_is_what_the_training_script_makes(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train_tokenizer.py")
    out = tmp_path / "tokenizer.model"
    subprocess.run([sys.executable, script, "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == open(default_tokenizer_path(), "rb").read()


def test_a_script_the_tokenizer_never_saw_plans_from_its_byte_pieces(vocab):
    """The multilingual case: a term that is only byte-fallback pieces starts from those bytes' rows, with a warning."""
    with pytest.warns(UserWarning, match=r"'ሰላም'.*byte-fallback pieces only.*<0xE1>"):
        plan = vocab.assign(["ሰላም"])
    entry = plan["ሰላም"]
    byte_ids = [i for i in vocab.encode("ሰላም") if vocab.piece(i).startswith("<0x")]
    assert entry.source_ids == tuple(byte_ids) and byte_ids
    assert vocab.renamed_encoder()("ሰላም") == [entry.id]


@pytest.mark.parametrize("edit, match", [
    (lambda e: e.update(id=500), r"plan entry 0 \(' \[summary\]'\): field 'id' = 500 is not a reserved slot"),
    (lambda e: e.update(piece="<unused9>"), r"plan entry 0 .*field 'piece' = '<unused9>', but id 7 is '<unused0>'"),
    (lambda e: e.update(source_ids=[5, 99999]), r"plan entry 0 .*field 'source_ids' has ids outside \[0, 1024\)"),
    (lambda e: e.update(source_ids="abc"), r"plan entry 0 .*field 'source_ids' has the wrong type"),
    (lambda e: e.pop("term"), r"plan entry 0 .*field 'term' is missing"),
    (lambda e: e.update(id="7"), r"plan entry 0 .*field 'id' has the wrong type"),
])
def test_a_tampered_plan_names_the_entry_and_field(vocab, tmp_path, edit, match):
    vocab.assign({"[summary]": "a short summary", "[qa]": "question and answer"})
    _, plan_path = vocab.save(tmp_path)
    raw = json.loads(open(plan_path, encoding="utf-8").read())
    edit(raw["entries"][0])
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump(raw, f)
    with pytest.raises(PlanError, match=match):
        ReservedVocab.from_file(default_tokenizer_path(), plan=plan_path)


def test_a_plan_repeating_an_id_is_refused(vocab, tmp_path):
    vocab.assign({"[summary]": "a short summary", "[qa]": "question and answer"})
    _, plan_path = vocab.save(tmp_path)
    raw = json.loads(open(plan_path, encoding="utf-8").read())
    raw["entries"][2].update(id=7, piece="<unused0>")
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump(raw, f)
    with pytest.raises(PlanError, match=r"plan entry 2 \(' \[qa\]'\): field 'id' repeats entry 0"):
        ReservedVocab.from_file(default_tokenizer_path(), plan=plan_path)


@pytest.mark.parametrize("make_args", [
    lambda d: ["plan", "--tokenizer", str(d / "not-a-tokenizer.model"), "--terms", str(d / "terms.txt"),
               "--out", str(d / "o")],
    lambda d: ["plan", "--tokenizer", str(d / "missing.model"), "--terms", str(d / "terms.txt"), "--out", str(d / "o")],
    lambda d: ["plan", "--plan", str(d / "bad_plan.json"), "--terms", str(d / "terms.txt"), "--out", str(d / "o")],
    lambda d: ["demo", "--model", str(d / "no-such-model"), "--steps", "1"],
], ids=["bad-tokenizer", "missing-tokenizer", "bad-plan", "bad-model"])
def test_cli_errors_are_one_line_without_a_traceback(tmp_path, make_args):
    import subprocess
    import sys

    (tmp_path / "not-a-tokenizer.model").write_bytes(b"\x00\x01 certainly not protobuf")
    (tmp_path / "terms.txt").write_text("[summary]\ta short summary\n", encoding="utf-8")
    (tmp_path / "bad_plan.json").write_text('{"format_version": 1, "tokenizer_sha256": "x", "entries": [{"id": 7}]}')
    env = {k: v for k, v in os.environ.items() if k != "RESERVED_KERNELS_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "reserved_kernels", *make_args(tmp_path)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reserved-kernels ") and ": error: " in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.fixture(params=["sentencepiece", "tokenizer.json"])
def any_vocab(request, tmp_path) -> ReservedVocab:
    """The embedded tokenizer as a SentencePiece model, and as the tokenizer.json transformers converts it to."""
    if request.param == "sentencepiece":
        return ReservedVocab.from_file(default_tokenizer_path())
    pytest.importorskip("transformers", reason="the tokenizer.json is transformers' conversion of the model")
    from reserved_kernels.vocab.hf_files import transformers_files

    path = tmp_path / "tokenizer.json"
    path.write_bytes(transformers_files(open(default_tokenizer_path(), "rb").read(), {}, {})["tokenizer.json"])
    return ReservedVocab.from_file(path)


# Where a user's text puts a term: the start of a text or a line, after a space (one or two), after punctuation or a
# bracket, before punctuation, twice in a row.
CONTEXTS = ["{t} first", "Set the {t} now", "one\n{t} two", "x  {t}.", "({t})", "a,{t};", "\"{t}\" and '{t}'",
            "{t}{t} {t}"]


def test_a_term_is_one_token_wherever_it_stands_and_decodes_as_written(any_vocab):
    plan = any_vocab.assign({"[lr]": "learning rate", "machine learning": None, "東京タワー": "the tower"})
    encode, decode = any_vocab.renamed_codec()
    for term in ("[lr]", "machine learning", "東京タワー"):
        bare, spaced = plan[term].id, plan[" " + term].id
        for context in CONTEXTS:
            text = context.format(t=term)
            ids = encode(text)
            assert ids.count(bare) + ids.count(spaced) == text.count(term), (text, ids)
            assert ids.count(spaced) == text.count(" " + term), (text, ids)  # the space goes into the token
            assert decode(ids) == text, (text, ids)  # no doubled or lost space


def test_text_without_the_terms_encodes_exactly_as_before(any_vocab):
    """Python's own documentation (pydoc_data, ~0.5 MB of real English and code) encodes to the same ids."""
    from reserved_kernels.demo.stories import pydoc_text

    text = pydoc_text()
    terms = {"[lr]": "learning rate", "[kwarg]": "keyword argument", "[summary]": None, "東京タワー": "the tower",
             "z-score": "standard score"}
    assert len(text) > 400_000 and not any(term in text for term in terms)
    before = any_vocab.encode(text)
    any_vocab.assign(terms)
    assert any_vocab.renamed_encoder()(text) == before


@pytest.mark.parametrize("term", [" the", "the", "▁the"])
def test_a_term_that_would_take_over_a_token_is_refused(any_vocab, term):
    any_vocab.assign(["[kept]"])
    before = any_vocab.plan
    with pytest.raises(PlanError, match=r"would take it over in ordinary text: .*'▁the' \(id 369\)"):
        any_vocab.assign([term, "[new]"])
    assert any_vocab.plan is before


def test_the_plan_records_its_vocabulary_digest_and_an_older_plan_learns_it(vocab, tmp_path):
    """pieces_sha256: the pieces joined by NUL, ▁ read as a space (how a GGUF's token list is compared with the
    tokenizer); saved with the plan, and filled in for a plan file written before it existed."""
    import hashlib

    from reserved_kernels.vocab.planning import pieces_digest

    pieces = [vocab.piece(i) for i in range(vocab.vocab_size)]
    expected = hashlib.sha256("\0".join(pieces).replace("\u2581", " ").encode("utf-8")).hexdigest()
    assert vocab.plan.pieces_sha256 == expected == pieces_digest(pieces)
    assert pieces_digest("\0".join(pieces).encode("utf-8")) == expected
    vocab.assign({"[summary]": "a short summary"})
    _, plan_path = vocab.save(tmp_path)
    raw = json.loads(open(plan_path, encoding="utf-8").read())
    assert raw["pieces_sha256"] == expected
    del raw["pieces_sha256"]
    with open(plan_path, "w", encoding="utf-8") as f:
        json.dump(raw, f)
    assert ReservedPlan.from_json(open(plan_path, encoding="utf-8").read())[0].pieces_sha256 is None
    assert ReservedVocab.from_file(default_tokenizer_path(), plan=plan_path).plan.pieces_sha256 == expected
