"""FP8 GEMM dispatch: every candidate that can run here agrees with the torch reference, and the per-shape rule
(selection, cache, autotune, fallback when a candidate is missing, raises or computes something else) works."""

import json

import pytest
import torch
from _helpers import rel_err, requires_triton

from deepseek_v3.kernels import act_quant, fp8_gemm, fp8_gemm_torch, fp8_grouped_gemm_torch, weight_quant
from deepseek_v3.kernels import fp8_dispatch as fd
from deepseek_v3.kernels.rule_cache import RuleCache, m_bucket


def _operands(M, N, K, seed=0, rows=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    xq, xs = act_quant(x, backend="torch")
    if rows:  # Wgrad-style b: 1x128 row scales
        bq, bs = act_quant(torch.randn(N, K, generator=g), backend="torch")
    else:
        bq, bs = weight_quant(torch.randn(N, K, generator=g) * 0.05, backend="torch")
    return xq, xs, bq, bs


def _grouped_operands(counts, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = sum(counts)
    xq, xs = act_quant(torch.randn(M, K, generator=g), backend="torch")
    wq, ws = weight_quant(torch.randn(len(counts), N, K, generator=g) * 0.05, backend="torch")
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return xq, xs, wq, ws, offs


# ---------------------------------------------------------------------------------------------------------------
# candidates vs the reference
# ---------------------------------------------------------------------------------------------------------------


def _runnable(cands, info, device):
    return [c for c in cands if c.available(device) is None and c.supports(info) is None]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,rows", [(256, 256, 256, False), (33, 200, 300, False), (64, 130, 256, True)])
def test_each_available_dense_candidate_matches_reference(M, N, K, rows, out_dtype, device):
    args = _operands(M, N, K, rows=rows)
    ref = fp8_gemm_torch(*args, out_dtype)
    dev_args = [t.to(device) for t in args]
    info = fd.gemm_shape_info(*dev_args, out_dtype)
    ran, refused = [], {}
    tol = 1e-5 if (device.type == "cpu" and out_dtype == torch.float32) else 8e-3
    for cand in _runnable(fd.dense_candidates(), info, device):
        try:
            out = cand.run(*dev_args, out_dtype).cpu()
        except RuntimeError as err:  # e.g. a cuBLAS build without this scale layout / output dtype: the rule skips it
            if cand.trusted:
                raise
            refused[cand.name] = str(err).splitlines()[0]
            continue
        assert out.shape == (M, N) and out.dtype == out_dtype, cand.name
        assert rel_err(out, ref) < tol, (cand.name, rel_err(out, ref))  # a candidate that runs must be right
        ran.append(cand.name)
    assert "torch" in ran
    if device.type == "cuda":  # whatever was refused, the dispatched public op is right
        assert rel_err(fp8_gemm(*dev_args, out_dtype).cpu(), ref) < tol, refused


@requires_triton
def test_torchao_candidate_runs_in_interpreter():
    """torchao's DeepSeek-style Triton GEMM, fed our operands in its layouts, equals our reference (CPU: its kernel
    with one fixed tile config under the interpreter; CUDA: its autotuned op)."""
    pytest.importorskip("torchao.prototype.blockwise_fp8_training.kernels")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = _operands(256, 256, 256, seed=4)
    dev_args = [t.to(device) for t in args]
    for out_dtype in (torch.float32, torch.bfloat16):
        out = fp8_gemm(*dev_args, out_dtype, backend="torchao").cpu()
        ref = fp8_gemm_torch(*args, out_dtype)
        assert rel_err(out, ref) < (1e-5 if device.type == "cpu" and out_dtype == torch.float32 else 8e-3)
    # shapes it cannot take are refused with the reason, not computed wrongly
    with pytest.raises(RuntimeError, match="multiples of 256|needs M, N"):
        fp8_gemm(*[t.to(device) for t in _operands(100, 256, 256)], torch.float32, backend="torchao")


@pytest.mark.parametrize("counts", [[5, 0, 17, 64], [128, 128]])
def test_each_available_grouped_candidate_matches_reference(counts, device):
    args = _grouped_operands(counts, 96, 256)
    ref = fp8_grouped_gemm_torch(*args, torch.float32)
    dev_args = [t.to(device) for t in args]
    info = fd.grouped_shape_info(*dev_args, torch.float32)
    ran = []
    for cand in _runnable(fd.grouped_candidates(), info, device):
        try:
            out = cand.run(*dev_args, torch.float32).cpu()
        except RuntimeError:
            if cand.name == "scaled_grouped_mm":  # torch 2.13 has no block-wise grouped cuBLAS: the rule skips it
                continue
            raise
        assert rel_err(out, ref) < (1e-5 if device.type == "cpu" else 2e-4), cand.name
        ran.append(cand.name)
    assert {"torch", "loop"} <= set(ran)


def test_cublas_scale_layouts():
    """The scale tensors handed to cuBLAS: a_s M-major; 128x128 b_s K-major with the K-block stride padded to a
    multiple of 4 (padding never changes the values read); 1x128 b_s N-major."""
    a_s = torch.rand(300, 3)
    b_s = torch.rand(2, 3)
    sa, sb = fd.cublas_scales(a_s, b_s, block_b=True)
    assert sa.shape == (300, 3) and sa.stride() == (1, 300) and torch.equal(sa, a_s)
    assert sb.shape == (4, 2) and sb.stride() == (1, 4)
    assert torch.equal(sb[:3], b_s.t()) and torch.equal(sb[3], torch.ones(2))
    sa, sb = fd.cublas_scales(a_s, torch.rand(2, 4), block_b=True)
    assert sb.shape == (4, 2) and sb.stride() == (1, 4)
    rows = torch.rand(130, 3)
    _, sb = fd.cublas_scales(a_s, rows, block_b=False)
    assert sb.shape == (130, 3) and sb.stride() == (1, 130) and torch.equal(sb, rows)


# ---------------------------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------------------------


def _fake(name, result=None, raises=None, available=None, supports=None, calls=None, trusted=False):
    def run(*args):
        if calls is not None:
            calls.append(name)
        if raises is not None:
            raise raises
        return result(*args) if result is not None else fp8_gemm_torch(*args)

    return fd.Candidate(name, run, lambda d: available, lambda info: supports, trusted)


def _dispatcher(cands, tmp_path, timer=None):
    return fd.Dispatcher("test_gemm", cands, fd.gemm_shape_info, lambda d: "torch", RuleCache(tmp_path / "r.json"),
                         **({"timer": timer} if timer else {}))  # fmt: skip


def test_rule_default_order_skips_missing_and_failing(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPSEEK_V3_AUTOTUNE", raising=False)
    calls = []
    wrong = lambda *a: fp8_gemm_torch(*a) * 1.5  # noqa: E731 -- e.g. a misread scale layout
    cands = [
        _fake("missing", available="not installed", calls=calls),
        _fake("unsupported", supports="shape not supported", calls=calls),
        _fake("raises", raises=RuntimeError("Invalid scaling configuration"), calls=calls),
        _fake("wrong", result=wrong, calls=calls),
        _fake("good", calls=calls),
        _fake("torch", trusted=True),
    ]
    d = _dispatcher(cands, tmp_path)
    args = (*_operands(64, 128, 256), torch.bfloat16)
    with pytest.warns(UserWarning):
        out = d(*args)
    assert "missing" not in calls and "unsupported" not in calls
    assert calls[:2] == ["raises", "wrong"] and calls.count("good") == 2  # verified once, then run
    torch.testing.assert_close(out, fp8_gemm_torch(*args))
    key = d.key(torch.device("cpu"), fd.gemm_shape_info(*args))
    assert "Invalid scaling" in d.failures[(key, "raises")] and "relative error" in d.failures[(key, "wrong")]
    calls.clear()
    d(*args)  # the choice is remembered: no new verification, failing candidates not retried
    assert calls == ["good"]
    assert not (tmp_path / "r.json").exists()  # an unmeasured default is not persisted


def test_rule_falls_back_to_reference_and_keys_by_shape_bucket(tmp_path):
    d = _dispatcher([_fake("raises", raises=ValueError("no")), _fake("torch", trusted=True)], tmp_path)
    args = (*_operands(70, 128, 256), torch.float32)
    with pytest.warns(UserWarning):
        assert d.choose(*args) == "torch"
    k70 = d.key(torch.device("cpu"), fd.gemm_shape_info(*args))
    k100 = d.key(torch.device("cpu"), fd.gemm_shape_info(*_operands(100, 128, 256), torch.float32))
    k200 = d.key(torch.device("cpu"), fd.gemm_shape_info(*_operands(200, 128, 256), torch.float32))
    assert k70 == k100 != k200 and "M128" in k70 and torch.__version__ in k70
    kbf = d.key(torch.device("cpu"), fd.gemm_shape_info(*_operands(70, 128, 256), torch.bfloat16))
    krows = d.key(torch.device("cpu"), fd.gemm_shape_info(*_operands(70, 128, 256, rows=True), torch.float32))
    assert len({k70, kbf, krows}) == 3
    assert [m_bucket(m) for m in (1, 2, 3, 4096, 4097, 16384, 20000)] == [1, 2, 4, 4096, 8192, 16384, 32768]


def test_rule_tune_persists_fastest_and_is_reused(tmp_path):
    speed = {"slow": 5.0, "fast": 1.0, "torch": 3.0}
    timer = lambda fn, device: (fn(), speed[current[0]])[1]  # noqa: E731
    current = [None]

    def tracked(name, **kw):
        cand = _fake(name, **kw)
        run = cand.run

        def wrapped(*a):
            current[0] = name
            return run(*a)

        cand.run = wrapped
        return cand

    cands = [tracked("slow"), tracked("fast"), tracked("broken", raises=RuntimeError("nope")),
             tracked("torch", trusted=True)]  # fmt: skip
    d = _dispatcher(cands, tmp_path, timer=timer)
    args = (*_operands(64, 128, 256), torch.bfloat16)
    with pytest.warns(UserWarning):
        entry = d.tune(*args)
    assert entry["choice"] == "fast" and set(entry["ms"]) == {"slow", "fast", "torch"} and "broken" in entry["errors"]
    data = json.loads((tmp_path / "r.json").read_text())
    (key,) = data
    assert data[key]["choice"] == "fast" and "test_gemm" in key
    # a fresh process (new dispatcher, same file) uses the measured choice without measuring or verifying
    calls = []
    d2 = _dispatcher([_fake("slow", calls=calls), _fake("fast", calls=calls), _fake("torch", trusted=True)], tmp_path)
    d2(*args)
    assert calls == ["fast"]
    # a cached choice that is not available here falls back to the default order
    d3 = _dispatcher([_fake("fast", available="gone"), _fake("torch", trusted=True)], tmp_path)
    assert d3.choose(*args) == "torch"


def test_rule_autotunes_at_first_use_on_cuda_only(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_V3_AUTOTUNE", "1")
    d = _dispatcher([_fake("a"), _fake("torch", trusted=True)], tmp_path, timer=lambda fn, device: 1.0)
    d(*_operands(16, 128, 128), torch.float32)
    assert not (tmp_path / "r.json").exists()  # CPU: no measurement, deterministic default
    assert d.choose(*_operands(16, 128, 128), torch.float32) == "a"


def test_real_scaled_mm_candidate_falls_back_where_cublas_refuses(tmp_path):
    """Forced onto CPU, torch refuses block-wise scales (only tensor-/row-wise exist there): the rule records the
    real error and the result is the reference's."""
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour of torch._scaled_mm")
    cands = fd.dense_candidates(scaled_mm_needs_hopper=False)
    d = fd.Dispatcher("test_gemm", cands, fd.gemm_shape_info, lambda dev: "torch", RuleCache(tmp_path / "r.json"),
                      default_order=lambda dev: ["scaled_mm", "torch"])  # fmt: skip
    args = (*_operands(64, 128, 256), torch.bfloat16)
    with pytest.warns(UserWarning, match="scaled_mm"):
        out = d(*args)
    torch.testing.assert_close(out, fp8_gemm_torch(*args))
    assert d.choose(*args) == "torch"


def test_unreadable_cache_is_ignored(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert RuleCache(path).get("x") is None


def test_cpu_auto_backend_stays_on_reference():
    """Without CUDA the public ops keep today's behaviour: backend=None is the torch reference (no dispatch)."""
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    args = _operands(32, 64, 128)
    assert torch.equal(fp8_gemm(*args, torch.float32), fp8_gemm_torch(*args, torch.float32))
    with pytest.raises(RuntimeError, match="cannot run here"):
        fp8_gemm(*args, torch.float32, backend="scaled_mm")


def test_cache_writers_in_two_processes_keep_each_others_entries(tmp_path):
    """Two caches on one file (e.g. the GEMM benchmark and the MLA sweep, run one after the other): each write merges
    with what is on disk, so neither loses the other's measurements."""
    path = tmp_path / "rules.json"
    first, second = RuleCache(path, shipped=None), RuleCache(path, shipped=None)
    first.get("warm")  # both have read the (empty) file before either writes
    second.get("warm")
    first.put("gemm", {"choice": "scaled_mm"})
    second.put("mla", {"choice": "h64_t32_x2_w8_s2"})
    assert set(json.loads(path.read_text())) == {"gemm", "mla"}
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"gemm": {"choice": "triton"}, "old": {"choice": "torch"}}))
    layered = RuleCache(path, shipped=shipped)
    assert layered.get("gemm")["choice"] == "scaled_mm" and layered.get("old")["choice"] == "torch"


def test_bucket_choice_only_for_shapes_the_candidate_supports(tmp_path):
    """K is bucketed (Wgrad's K = tokens varies per batch): a choice made at K = 256 is reused at K = 200 (same
    bucket) only if the candidate supports K = 200 exactly; otherwise the default order runs for that call, and
    the bucket keeps its choice."""
    calls = []
    picky = _fake("picky", calls=calls)
    picky.supports = lambda info: None if info["K"] % 128 == 0 else "needs K % 128 == 0"
    d = _dispatcher([picky, _fake("torch", trusted=True)], tmp_path)
    a256 = (*_operands(64, 128, 256), torch.float32)
    a200 = (*_operands(64, 128, 200), torch.float32)
    key = lambda a: d.key(torch.device("cpu"), fd.gemm_shape_info(*a))  # noqa: E731
    assert key(a256) == key(a200)
    assert d.choose(*a256) == "picky"
    assert d.choose(*a200) == "torch"
    assert d.choose(*a256) == "picky" and not d.failures


@pytest.mark.parametrize("K", [512, 640])  # 640: 5 K blocks, the 128x128 scales padded to 8
@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_scaled_mm_candidate_passes_torch_layout_checks(K, block, transposed):
    """The real cuBLAS candidate on meta tensors: torch's own shape / stride checks of the block-wise scaled_mm
    (1x128 x 128x128 for Fprop / Dgrad, 1x128 x 1x128 for Wgrad) accept what it builds, also from the transposed
    views that Dgrad / Wgrad pass. (The numerics need a Hopper GPU.)"""
    import torch.nn.functional as F

    if not hasattr(F, "scaled_mm") or fd._scaling_types() is None:
        pytest.skip("this torch has no block-wise scaled_mm")
    M, N, meta = 256, 384, {"device": "meta"}
    kb = K // 128
    if transposed:  # b given as the transpose of a [K, N] tensor, as Dgrad's wq.t(); a as Wgrad's dq.t()
        a = torch.empty(K, M, dtype=torch.float8_e4m3fn, **meta).t()
        b = torch.empty(K, N, dtype=torch.float8_e4m3fn, **meta).t()
    else:
        a = torch.empty(M, K, dtype=torch.float8_e4m3fn, **meta)
        b = torch.empty(N, K, dtype=torch.float8_e4m3fn, **meta)
    a_s = torch.empty(M, kb, **meta)
    b_s = torch.empty(N // 128 if block else N, kb, **meta)
    for out_dtype in (torch.bfloat16, torch.float32):
        out = fd._scaled_mm_gemm(a, a_s, b, b_s, out_dtype)
        assert out.shape == (M, N) and out.dtype == out_dtype
    # and the checks are real: the transposed 128x128 scale layout is refused
    sa, sb = fd.cublas_scales(a_s, b_s, block)
    t1x128, t128x128 = fd._scaling_types()
    with pytest.raises(RuntimeError):
        F.scaled_mm(a.contiguous(), b.contiguous().t(), sa, t1x128, sb.t(), t128x128 if block else t1x128,
                    output_dtype=torch.bfloat16)  # fmt: skip
