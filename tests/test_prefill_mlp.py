"""A bf16 prefill chunk's gated MLP in three calls (verifiers/prefill_mlp.py, csrc/act_mul_bf16.h): the
kernel is act(gate) * up rounded once to bf16, the fused MLP computes the unfused bf16 MLP, and the real
models take it for bf16 prefill chunks only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quickdraft.verifiers import prefill_mlp, small_linear
from quickdraft.verifiers.prefill_mlp import GELU_TANH, SILU, act_mul_bf16

VECTOR = prefill_mlp.supported()
ISAS = ["reference", "auto"] if VECTOR else ["reference"]


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart two bf16 tensors are, element by element; 0 where both are under 1e-30
    (products that far down the exponential's tail are zero for any layer after this one)."""
    def line(t):
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)  # sign-magnitude bit patterns onto one line
    tiny = (a.float().abs() < 1e-30) & (b.float().abs() < 1e-30)
    return torch.where(tiny, 0, (line(a) - line(b)).abs())


def torch_act_mul(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    g = gate.float()
    a = F.silu(g) if act == SILU else F.gelu(g, approximate="tanh")
    return (a * up.float()).to(torch.bfloat16)


def exact_act_mul(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    """In fp64, as x sigmoid(z) (torch's fp32 tanh form loses the far negative tail to cancellation)."""
    x = gate.double()
    z = x if act == SILU else 2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)
    return (x * torch.sigmoid(z) * up.double()).float().to(torch.bfloat16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", [SILU, GELU_TANH], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (3, 15), (70, 1536), (9, 33), (200, 2048)])
def test_the_kernel_is_the_activation_times_up_rounded_once(isa, act, rows, cols):
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    # gate and up as views of one wider product, as the fused MLP passes them (row stride 2 * cols)
    both = (torch.randn(rows, 2 * cols, generator=gen) * 4).to(torch.bfloat16)
    gate, up = both[:, :cols], both[:, cols:]
    got = act_mul_bf16(gate, up, act, isa)
    steps = bf16_steps(got, exact_act_mul(gate, up, act))
    # One rounding of a value computed a little differently: at most one bf16 step, and rarely even that.
    assert int(steps.max()) <= 1
    assert float((steps > 0).float().mean()) < 0.02
    # and what torch's unfused steps give, to within their own rounding
    assert torch.allclose(got.float(), torch_act_mul(gate, up, act).float(), rtol=2 ** -7, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", [SILU, GELU_TANH], ids=["silu", "gelu_tanh"])
def test_the_kernel_keeps_its_limits_at_extreme_inputs(isa, act):
    gate = torch.tensor([[-1e4, -200.0, -40.0, -0.0, 0.0, 1e-30, 40.0, 200.0, 1e4, 3e38, -3e38, 2.5, -2.5, 7.0,
                          -7.0, 1.0, 0.5]]).to(torch.bfloat16)
    up = torch.ones_like(gate)
    got = act_mul_bf16(gate, up, act, isa).float()
    assert torch.isfinite(got).all()
    want = exact_act_mul(gate, up, act).float()
    assert torch.allclose(got, want, rtol=2 ** -7, atol=0)
    # far below zero the activation vanishes, far above it is the input itself
    assert float(got[0, 0]) == 0.0 and float(got[0, 10]) == 0.0
    assert float(got[0, 8]) == float(gate[0, 8]) and float(got[0, 9]) == float(gate[0, 9])


def test_the_vector_path_is_the_reference_but_for_rounding_boundaries():
    if not VECTOR:
        with pytest.raises(ValueError, match="AVX-512 BF16"):
            act_mul_bf16(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(2, 16, dtype=torch.bfloat16), SILU)
        return
    gen = torch.Generator().manual_seed(5)
    gate = (torch.randn(512, 1000, generator=gen) * 3).to(torch.bfloat16)
    up = torch.randn(512, 1000, generator=gen).to(torch.bfloat16)
    for act in (SILU, GELU_TANH):
        steps = bf16_steps(act_mul_bf16(gate, up, act), act_mul_bf16(gate, up, act, "reference"))
        assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 0.01


def test_bad_operands_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="bf16 matrices of one shape"):
        act_mul_bf16(torch.ones(2, 4), torch.ones(2, 4), SILU, "reference")
    with pytest.raises(ValueError, match="contiguous"):
        t = torch.ones(4, 4, dtype=torch.bfloat16)
        act_mul_bf16(t.t(), t, SILU, "reference")
    with pytest.raises(ValueError, match="act must be"):
        small_linear._kernels.act_mul_bf16(0, 0, 0, 0, 0, 0, 0, 0, 7, 1, "reference")


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, width: int, act: nn.Module, swapped: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = act
        self.swapped = swapped

    def forward(self, x):
        if self.swapped:  # not the gated form the fused path assumes
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _model(*mlps: nn.Module) -> nn.Module:
    model = nn.Sequential(*mlps)
    small_linear.install(model)
    return model


def test_install_fuses_gated_mlps_and_only_bf16_prefill_chunks_take_it(monkeypatch):
    torch.manual_seed(0)
    silu, gelu = GatedMLP(64, 160, nn.SiLU()), GatedMLP(64, 160, nn.GELU(approximate="tanh"))
    relu, swapped = GatedMLP(64, 160, nn.ReLU()), GatedMLP(64, 160, nn.SiLU(), swapped=True)
    model = _model(silu, gelu, relu, swapped)
    if not VECTOR:  # a CPU without AVX-512 BF16: nothing is fused, every MLP keeps its forward
        assert prefill_mlp.install(model) == 0
        assert not any(isinstance(m, prefill_mlp.PrefillMLP) for m in model)
        return
    x = torch.randn(3, 100, 64)
    with torch.no_grad(), small_linear.prefill_precision(torch.bfloat16):
        before = [m(x) for m in model]
    # a ReLU is not one of the kernel's activations; the swapped MLP fails the check on values
    assert prefill_mlp.install(model) == 2
    assert isinstance(silu, prefill_mlp.PrefillMLP) and isinstance(gelu, prefill_mlp.PrefillMLP)
    assert not isinstance(relu, prefill_mlp.PrefillMLP) and not isinstance(swapped, prefill_mlp.PrefillMLP)
    assert prefill_mlp.install(model) == 0  # once is enough
    # what the fused path keeps: the stacked gate and up, down's bf16 copy; no copies of gate or up alone
    for m in (silu, gelu):
        assert prefill_mlp.STACKED in m.gate_proj.__dict__ and "_lowp" in m.down_proj.__dict__
        assert "_lowp" not in m.gate_proj.__dict__ and "_lowp" not in m.up_proj.__dict__
    assert prefill_mlp.STACKED not in swapped.gate_proj.__dict__

    calls = []
    real = prefill_mlp.act_mul_bf16
    monkeypatch.setattr(prefill_mlp, "act_mul_bf16", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    with torch.no_grad(), small_linear.prefill_precision(torch.bfloat16):
        after = [m(x) for m in model]
    assert calls == [SILU, GELU_TANH]
    for b, a in zip(before, after, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert float((a - b).abs().max()) <= 2 ** -6 * float(b.abs().max())
    # fp32 prefill, small calls and verification passes keep the model's own forward
    with torch.no_grad():
        assert torch.equal(silu(x), GatedMLP.forward(silu, x))
        with small_linear.prefill_precision(torch.bfloat16):
            silu(x[:, :2])
            with small_linear.invariant():
                silu(x)
    assert calls == [SILU, GELU_TANH]


class ThreeD(GatedMLP):
    def forward(self, x):  # takes only [batch, seq, hidden]: the install's check on [rows, hidden] fails
        batch, seq, hidden = x.shape
        return super().forward(x)


def test_an_mlp_whose_forward_fails_the_check_keeps_its_own(monkeypatch):
    mlp = ThreeD(64, 96, nn.SiLU())
    model = _model(mlp)
    assert prefill_mlp.install(model) == 0  # (on a CPU without AVX-512 BF16 for that reason alone)
    assert type(mlp) is ThreeD and prefill_mlp.STACKED not in mlp.gate_proj.__dict__
    x = torch.randn(2, 80, 64)
    with torch.no_grad(), small_linear.prefill_precision(torch.bfloat16):
        assert mlp(x).shape == x.shape


def test_install_does_nothing_without_the_kernel(monkeypatch):
    monkeypatch.setattr(prefill_mlp, "supported", lambda: False)
    model = _model(GatedMLP(64, 96, nn.SiLU()))
    assert prefill_mlp.install(model) == 0
    assert not isinstance(model[0], prefill_mlp.PrefillMLP)


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_the_real_models_prefill_in_bf16_through_the_fused_mlps(name, monkeypatch):
    from quickdraft.bench.prefill_cost import prefill
    from quickdraft.verifiers.model_loader import load_model

    if name.startswith("smollm2"):  # fp32 prefill: nothing to fuse
        plain = load_model(name, decode_dtype="float32", prefill_dtype="float32").model
        assert not any(isinstance(m, prefill_mlp.PrefillMLP) for m in plain.modules())
        del plain
    loaded = load_model(name, decode_dtype="float32", prefill_dtype="bfloat16")
    model = loaded.model
    fused = [m for m in model.modules() if isinstance(m, prefill_mlp.PrefillMLP)]
    if not VECTOR:
        assert fused == []
        return
    assert len(fused) == model.config.num_hidden_layers
    calls = []
    real = prefill_mlp.act_mul_bf16
    monkeypatch.setattr(prefill_mlp, "act_mul_bf16", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    ids = torch.randint(100, 40000, (1, 600), generator=torch.Generator().manual_seed(3))
    _, with_fused = prefill(model, ids, 300, two_pass=True, lowp=torch.bfloat16)
    assert len(calls) == 2 * model.config.num_hidden_layers  # every layer of both chunks
    assert set(calls) == {SILU if name.startswith("smollm2") else GELU_TANH}
    base = type(fused[0]).__mro__[2]
    for m in fused:
        m.__class__ = base
    _, unfused = prefill(model, ids, 300, two_pass=True, lowp=torch.bfloat16)
    _, fp32 = prefill(model, ids, 300, two_pass=True)
    # the same next token; the fused path no further from fp32 than bf16 rounding takes the unfused one
    assert with_fused.argmax() == unfused.argmax() == fp32.argmax()
    assert (with_fused - fp32).abs().max() <= 2 * (unfused - fp32).abs().max() + 0.05
