"""Huge-page storage of CPU label tables (cascadexml_fast.hugepages)."""
import io

import pytest
import torch

import cascadexml_fast as cx
from cascadexml_fast import hugepages as hp

THP = hp.thp_mode() in ("always", "madvise")
needs_thp = pytest.mark.skipif(not THP, reason=f"transparent huge pages are {hp.thp_mode()!r} on this machine")
BIG = (3 * hp.HUGE_PAGE_BYTES) // 8 + 123 * 64  # fp32 elements: a bit over 1.5 huge pages


def test_thp_mode_reads_the_kernel_setting():
    assert hp.thp_mode() in ("always", "madvise", "never", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.uint8, torch.float64])
def test_hugepage_empty_gives_a_usable_contiguous_tensor(dtype):
    rows = (3 * hp.HUGE_PAGE_BYTES // 2) // (64 * torch.empty((), dtype=dtype).element_size()) + 7
    shape = (rows, 64)  # a bit over 1.5 huge pages of any dtype
    t = hp.hugepage_empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    src = torch.arange(t.numel()).remainder(100).to(dtype).view(shape)
    t.copy_(src)
    assert torch.equal(t, src)
    if THP:
        assert t.data_ptr() % hp.HUGE_PAGE_BYTES == 0


def test_hugepage_zeros_is_zero():
    assert not hp.hugepage_zeros((BIG,)).any()


def test_small_tensors_use_plain_memory():
    t = hp.hugepage_empty((10, 10))
    assert t.shape == (10, 10) and t.untyped_storage().nbytes() == 400  # no mmap region behind it


@needs_thp
def test_the_kernel_backs_the_table_with_huge_pages():
    before = hp.process_hugepage_bytes()
    t = hp.hugepage_zeros((8 * hp.HUGE_PAGE_BYTES // 4,))  # 8 huge pages, touched by zero_()
    # most of them at least (the kernel may lack free 2 MiB blocks for a few)
    assert hp.process_hugepage_bytes() - before >= 4 * hp.HUGE_PAGE_BYTES
    del t


def test_copies_save_and_load_as_ordinary_tensors():
    t = hp.hugepage_empty((BIG,)).normal_()
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf)["w"], t)
    assert torch.equal(t.clone(), t) and torch.equal(t.to(torch.float64), t.double())


def test_table_empty_elsewhere_is_torch_empty():
    t = hp.table_empty((4, 8), torch.float32, "meta")
    assert t.device.type == "meta" and t.shape == (4, 8)


@needs_thp
def test_to_hugepages_moves_big_parameters_and_keeps_their_identity():
    model = torch.nn.Sequential(torch.nn.Embedding(BIG // 32, 32), torch.nn.Linear(4, 3))
    big, small = model[0].weight, model[1].weight
    before_big, before_small = big.detach().clone(), small.data_ptr()
    assert big.data_ptr() % hp.HUGE_PAGE_BYTES != 0  # plain torch memory first
    assert hp.to_hugepages(model, min_bytes=hp.HUGE_PAGE_BYTES) is model
    assert model[0].weight is big and torch.equal(big, before_big)
    assert big.data_ptr() % hp.HUGE_PAGE_BYTES == 0
    assert small.data_ptr() == before_small  # below min_bytes: left alone
    moved = big.data_ptr()
    hp.to_hugepages(model, min_bytes=hp.HUGE_PAGE_BYTES)
    assert big.data_ptr() == moved  # already there: not copied again


def test_to_hugepages_rejects_other_objects():
    with pytest.raises(TypeError, match="obj"):
        hp.to_hugepages([torch.zeros(3)])


@needs_thp
def test_library_tables_and_optimizer_state_live_in_huge_pages():
    rows = BIG // 64
    layer = cx.ShortlistedLinear(rows, 64, sparse_grad=True)
    assert layer.weight.data_ptr() % hp.HUGE_PAGE_BYTES == 0
    q, _ = cx.quantize_table(layer.weight.detach().repeat(4, 1))
    assert q.data_ptr() % hp.HUGE_PAGE_BYTES == 0
    opt = cx.SparseAdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(3, 64)
    idx = torch.randint(0, rows, (3, 5))
    layer(x, idx).sum().backward()
    opt.step()
    state = opt.state[layer.weight]
    assert state["exp_avg"].data_ptr() % hp.HUGE_PAGE_BYTES == 0
    assert state["exp_avg_sq"].data_ptr() % hp.HUGE_PAGE_BYTES == 0
    # a reloaded optimizer moves its state back into huge pages
    opt2 = cx.SparseAdamW(layer.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[layer.weight]["exp_avg"].data_ptr() % hp.HUGE_PAGE_BYTES == 0
    assert torch.equal(opt2.state[layer.weight]["exp_avg"], state["exp_avg"])


def test_info_reports_the_setting():
    assert cx.info()["transparent_hugepages"] == hp.thp_mode()
    assert cx.to_hugepages is hp.to_hugepages


def test_a_table_covers_its_whole_storage_so_safetensors_saves_it(tmp_path):
    from safetensors.torch import load_file, save_model

    layer = cx.ShortlistedLinear(BIG // 64, 64)
    assert layer.weight.untyped_storage().nbytes() == layer.weight.numel() * 4
    save_model(layer, str(tmp_path / "m.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["weight"], layer.weight.detach())


def test_the_sparse_weight_gradient_of_a_big_batch_comes_in_huge_pages():
    """The C++ kernel's [U, D] row-gradient buffer (a fresh one every training step) is 2 MiB-aligned huge-page
    memory once it spans a huge page, and holds the same values as the reference."""
    from cascadexml_fast.ops import reference

    gen = torch.Generator().manual_seed(0)
    B, K, D, N = 8, 300, 320, 5000  # U ~ 1,900 distinct rows x 320 fp32: ~2.4 MB, over one huge page
    x, grad = torch.randn(B, D, generator=gen), torch.randn(B, K, generator=gen)
    idx = torch.randint(-1, N, (B, K), generator=gen)
    rows, dw, db = torch.ops.cascadexml_fast.shortlist_score_grad_weight_rows(grad, x, idx)
    ref_rows, ref_dw, ref_db = reference.shortlist_score_grad_weight_rows(grad, x, idx)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, ref_db, rtol=1e-5, atol=1e-5)
    assert dw.numel() * 4 >= hp.HUGE_PAGE_BYTES
    if THP:
        assert dw.data_ptr() % hp.HUGE_PAGE_BYTES == 0
