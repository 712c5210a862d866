"""The Triton grammar-mask op (``_bitmask_kernel.py``) vs a per-token Python reference and vs the torch
path, on random masks: vocabularies that are not a multiple of 32 nor of the block, bitmasks narrower
than the vocabulary, a subset of rows in random order, fp32 / bf16 / fp16, strided logits.  The op only
writes -inf, so every comparison is exact (allowed tokens keep their bits)."""
import pytest
import torch

from vllm.structured_output.bitmask import _use_triton, apply_token_bitmask_

NEG_INF = float("-inf")


def _python_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Token by token with Python ints: token t stays when bit t % 32 of word t // 32 is 1."""
    out = logits.clone()
    words = [[int(w) & 0xFFFFFFFF for w in r] for r in bitmask.tolist()]
    for r, row in enumerate(rows):
        for t in range(logits.shape[1]):
            word = words[r][t // 32] if t // 32 < len(words[r]) else 0
            if not (word >> (t % 32)) & 1:
                out[row, t] = NEG_INF
    return out


def _random_mask(g: torch.Generator, n_rows: int, n_words: int) -> torch.Tensor:
    return torch.randint(-2**31, 2**31, (n_rows, n_words), generator=g, dtype=torch.int64).to(torch.int32)


def _triton(logits, bitmask, rows, words_per_block):
    from vllm.structured_output.bitmask import _apply_token_bitmask_triton_, _check_mask_args
    _check_mask_args(logits, bitmask, rows)
    assert _use_triton(logits, True)
    _apply_token_bitmask_triton_(logits, bitmask, rows, words_per_block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,n_words,words_per_block", [
    (333, 11, 4),    # V % 32 != 0, V % 128 != 0: the last block and the last word are partial
    (997, 32, 8),    # bitmask wider than needed by one word's worth (ceil(997 / 32) = 32)
    (640, 17, 4),    # bitmask narrower than the vocabulary: ids from 544 on are not allowed
    (300, 10, 128),  # one block wider than the whole vocabulary
])
def test_kernel_matches_references(dtype, vocab, n_words, words_per_block):
    g = torch.Generator().manual_seed(vocab * 7 + n_words)
    batch = 7
    rows = torch.randperm(batch, generator=g)[:4]  # a subset, in random order
    bitmask = _random_mask(g, len(rows), n_words)
    logits = torch.randn(batch, vocab, generator=g).to(dtype)
    expected = _python_reference(logits, bitmask, rows.tolist())
    torch_path = logits.clone()
    apply_token_bitmask_(torch_path, bitmask, rows, use_triton=False)
    assert torch.equal(torch_path, expected)
    got = logits.clone()
    _triton(got, bitmask, rows, words_per_block)
    assert torch.equal(got, expected)
    untouched = [r for r in range(batch) if r not in rows.tolist()]
    assert torch.equal(got[untouched], logits[untouched])


@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
def test_kernel_strided_logits_and_int32_rows(rows_dtype):
    """Logits that are a view with a row stride past the vocabulary (and every second row of their
    parent): the op writes inside the view only."""
    g = torch.Generator().manual_seed(5)
    vocab, batch = 421, 6
    parent = torch.randn(2 * batch, vocab + 45, generator=g, dtype=torch.float32)
    before = parent.clone()
    logits = parent[::2, 13:13 + vocab]
    assert logits.stride() == (2 * (vocab + 45), 1)
    rows = torch.tensor([5, 1, 3], dtype=rows_dtype)
    bitmask = _random_mask(g, 3, 14)
    expected = _python_reference(logits, bitmask, rows.tolist())
    _triton(logits, bitmask, rows, 4)
    assert torch.equal(logits, expected)
    outside = torch.ones_like(parent, dtype=torch.bool)
    outside[::2, 13:13 + vocab] = False
    assert torch.equal(parent[outside], before[outside])


def test_kernel_every_row_and_column_strided_mask():
    """rows=None (row i for row i); the bitmask a column slice of a wider one."""
    g = torch.Generator().manual_seed(9)
    vocab, batch = 257, 3
    wide = _random_mask(g, batch, 20)
    bitmask = wide[:, 3:12]
    logits = torch.randn(batch, vocab, generator=g)
    expected = _python_reference(logits, bitmask, list(range(batch)))
    _triton(logits, bitmask, None, 2)
    assert torch.equal(logits, expected)


def test_kernel_all_zero_and_all_one_rows():
    vocab = 200
    logits = torch.randn(3, vocab)
    bitmask = torch.tensor([[0] * 7, [-1] * 7], dtype=torch.int32)
    got = logits.clone()
    _triton(got, bitmask, torch.tensor([2, 0]), 4)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[1], logits[1])
    assert bool((got[2] == NEG_INF).all())


def test_public_op_forced_to_triton_default_block():
    """``apply_token_bitmask_(..., use_triton=True)``: the default block (128 words), two blocks per row."""
    g = torch.Generator().manual_seed(3)
    vocab = 4200
    logits = torch.randn(4, vocab, generator=g)
    rows = torch.tensor([3, 1], dtype=torch.int32)
    bitmask = _random_mask(g, 2, 132)
    expected = logits.clone()
    apply_token_bitmask_(expected, bitmask, rows, use_triton=False)
    got = logits.clone()
    apply_token_bitmask_(got, bitmask, rows, use_triton=True)
    assert torch.equal(got, expected) and bool((got[3, 132 * 32:] == NEG_INF).all())


def test_kernel_no_rows_is_a_no_op():
    logits = torch.randn(4, 100)
    got = logits.clone()
    _triton(got, torch.empty(0, 4, dtype=torch.int32), torch.empty(0, dtype=torch.int64), 4)
    assert torch.equal(got, logits)


@pytest.mark.parametrize("bad,match", [
    (lambda l, b, r: (l, b.to(torch.int64), r), "int32"),
    (lambda l, b, r: (l, b, r[:1]), "one per bitmask row"),
    (lambda l, b, r: (l, b, r.float()), "int32 or int64"),
    (lambda l, b, r: (l[0], b, r), r"\[batch, vocab\]"),
    (lambda l, b, r: (l, b, None), "one row per logits row"),
])
def test_bad_arguments_are_named(bad, match):
    logits, bitmask, rows = torch.randn(3, 64), torch.zeros(2, 2, dtype=torch.int32), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=match):
        apply_token_bitmask_(*bad(logits, bitmask, rows))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        apply_token_bitmask_(torch.randn(1, 64), torch.zeros(1, 2, dtype=torch.int32), use_triton=True)
    assert not _use_triton(torch.randn(1, 64), None)  # CPU default: the torch path


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_real_vocab_batch_64(dtype):
    """Qwen3's vocabulary at batch 64: the default (Triton) path vs the torch path and a numpy unpack,
    on every row and on 32 rows in random order; then captured in a CUDA graph and replayed on new
    masks (no host sync, no allocation)."""
    import numpy as np

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    batch, vocab = 64, 151936
    n_words = (vocab + 31) // 32
    logits = torch.randn(batch, vocab, generator=g).to(dtype).to(dev)
    assert _use_triton(logits, None)
    for rows in (None, torch.randperm(batch, generator=g)[:32]):
        n = batch if rows is None else len(rows)
        bitmask = _random_mask(g, n, n_words).to(dev)
        rows_dev = None if rows is None else rows.to(dev)
        got, ref = logits.clone(), logits.clone()
        apply_token_bitmask_(got, bitmask, rows_dev)
        apply_token_bitmask_(ref, bitmask, rows_dev, use_triton=False)
        assert torch.equal(got, ref)
        bits = np.unpackbits(bitmask.cpu().numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        idx = list(range(batch)) if rows is None else rows.tolist()
        expected = logits.cpu()[idx].masked_fill(torch.from_numpy(bits == 0), NEG_INF)
        assert torch.equal(got.cpu()[idx], expected)

    rows = torch.randperm(batch, generator=g)[:32].to(dev)
    bitmask = _random_mask(g, 32, n_words).to(dev)
    static = logits.clone()
    apply_token_bitmask_(static, bitmask, rows)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_token_bitmask_(static, bitmask, rows)
    for _ in range(2):
        bitmask.copy_(_random_mask(g, 32, n_words).to(dev))
        rows.copy_(torch.randperm(batch, generator=g)[:32].to(dev))
        static.copy_(logits)
        graph.replay()
        ref = logits.clone()
        apply_token_bitmask_(ref, bitmask, rows, use_triton=False)
        assert torch.equal(static, ref)
