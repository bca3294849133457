"""jaxdiff.compiler: the options every jaxdiff program compiles with, and the jit that applies them."""

import ast
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxdiff import compiler

CPU = jax.default_backend() == "cpu"
PACKAGE = pathlib.Path(compiler.__file__).parent


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _program(x, w, m):
    """A convolution, its kernel gradient, a dot and a reduction: one op of each kind XLA may fuse."""
    y, vjp = jax.vjp(lambda w: _conv(x, w), w)
    z = y.reshape(-1, y.shape[-1]) @ m
    return vjp(y)[0], z, jnp.sum(jnp.tanh(y), axis=(1, 2))


def _args():
    rng = np.random.RandomState(0)
    return (jnp.asarray(rng.randn(2, 16, 16, 32), jnp.float32), jnp.asarray(rng.randn(3, 3, 32, 32) * 0.1, jnp.float32),
            jnp.asarray(rng.randn(32, 32), jnp.float32))


def _fusions(text: str) -> dict[str, int]:
    """How many YNNPACK fusions of each kind an optimized HLO module holds, by the op inside them."""
    calls = {}
    for line in text.splitlines():
        if "ynn_fusion" in line and " fusion(" in line and "calls=" in line:
            calls[line.split("calls=")[1].split(",")[0].strip().lstrip("%")] = 0
    kinds = {"convolution": 0, "dot": 0, "reduce": 0}
    current = None
    for line in text.splitlines():
        if line.rstrip().endswith("{") and not line.startswith(" "):
            current = line.split()[0].lstrip("%")
            if current == "ENTRY":
                current = None
            continue
        if current in calls:
            for kind in kinds:
                if f" {kind}(" in line:
                    kinds[kind] += 1
    return kinds


@pytest.mark.skipif(not CPU, reason="the options concern XLA's CPU backend")
def test_on_this_cpu_convolutions_leave_ynnpack_and_dots_and_reductions_stay():
    """The assumption `options()` rests on: XLA gives convolutions (and their gradients), dots and
    reductions to YNNPACK by default, and the options take exactly the convolutions away. A jax
    whose defaults differ makes this fail: CPU_OPTIONS then needs a new look."""
    args = _args()
    default = _fusions(jax.jit(_program).lower(*args).compile().as_text())
    chosen = _fusions(jax.jit(_program, compiler_options=compiler.options()).lower(*args).compile().as_text())
    assert default["convolution"] >= 2 and default["dot"] >= 1 and default["reduce"] >= 1, default
    assert chosen["convolution"] == 0, chosen
    assert chosen["dot"] == default["dot"] and chosen["reduce"] == default["reduce"], (default, chosen)


@pytest.mark.skipif(not CPU, reason="the options concern XLA's CPU backend")
def test_jit_compiles_with_the_options_and_the_same_answers():
    args = _args()
    jitted = compiler.jit(_program)
    assert _fusions(jitted.lower(*args).compile().as_text())["convolution"] == 0   # .lower goes through
    ours, plain = jitted(*args), jax.jit(_program)(*args)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_jit_called_inside_another_trace_is_a_plain_jit():
    """Only a top-level jit takes compiler options: inside your own jax.jit, grad or eval_shape
    (with or without a traced argument) a compiler.jit function runs as jax.jit would."""
    inner = compiler.jit(lambda x: jnp.sin(x) * 2)
    x = jnp.linspace(-1.0, 1.0, 8)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: inner(x) + 1)(x)), np.sin(x) * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(lambda x: inner(x).sum())(x)), np.cos(x) * 2, rtol=1e-6)
    assert jax.eval_shape(inner, jax.ShapeDtypeStruct((3,), jnp.float32)).shape == (3,)
    const = jax.jit(lambda x: x + inner(np.ones(3, np.float32)))(jnp.zeros(3))   # no tracer reaches inner
    np.testing.assert_allclose(np.asarray(const), np.sin(1.0) * 2 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(inner(x)), np.sin(x) * 2, rtol=1e-6)   # still top-level


def test_jit_keeps_jax_jit_arguments_and_decorator_forms():
    calls = []

    @functools.partial(compiler.jit, static_argnames=("power",))
    def f(x, power=2):
        calls.append(power)                       # runs at trace time only
        return x ** power

    x = jnp.arange(4.0)
    np.testing.assert_array_equal(np.asarray(f(x, power=3)), np.arange(4.0) ** 3)
    f(x, power=3)
    assert calls == [3]                           # one trace: the jitted function is built once
    assert f.__name__ == "f" and f.__wrapped__.__name__ == "f"

    @compiler.jit
    def g(x):
        return x + 1
    np.testing.assert_array_equal(np.asarray(g(x)), np.arange(4.0) + 1)
    assert repr(g).startswith("jaxdiff.compiler.jit(") and ".g" in repr(g)
    with pytest.raises(TypeError, match="compiler_options"):
        compiler.jit(g, compiler_options={})


def test_options_are_none_off_the_cpu_and_when_xla_flags_choose(monkeypatch):
    assert compiler._probe("gpu") is None and compiler._probe("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    assert compiler._probe("cpu") is None


@pytest.mark.skipif(not CPU, reason="the options concern XLA's CPU backend")
def test_an_option_xla_refuses_is_one_warning_line_and_the_defaults(monkeypatch, capsys):
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {compiler.FUSION_TYPES: "LIBRARY_FUSION_TYPE_NO_SUCH_KIND"})
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler._probe("cpu") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxdiff: warning: XLA does not take"), err


def test_the_package_compiles_only_through_compiler_jit():
    """Every `jax.jit` in jaxdiff is `compiler.jit`, so no program misses the options."""
    bare = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compiler.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("jit", "pmap")
                    and isinstance(node.value, ast.Name) and node.value.id == "jax"):
                bare.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "jax" and any(a.name == "jit" for a in node.names):
                bare.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not bare, bare
