"""Classifier-free guidance on a sharded batch moves no data between devices inside the sampler's loop.

`guidance.evaluate_branches` lays the branches out sample-major (row b * n + k is sample b under
branch k), so with the batch sharded over the mesh's "data" axis each device evaluates both the
conditional and the unconditional branch of its own samples. Laid out branch-major (all
unconditional rows, then all conditional ones) the same program on 8 devices resharded the
doubled batch at every step: 4 collective-permutes and 2 all-to-alls in the loop body.

The check reads the optimised per-device HLO of the pipeline's program (`Pipeline.lower`) for 8
images on the 8 simulated CPU devices (tests/conftest.py). The collectives counted are
collective-permute, all-gather, all-to-all, all-reduce and reduce-scatter, in their synchronous
and asynchronous (`-start`) forms. None is allowed in any while loop body or in the computations
it calls: every step's work is per sample (the non-finite check too: `sampler.first_nonfinite`
reduces within each sample), so none is needed there.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxcontrol import demo
from jaxcontrol import guidance as G
from jaxcontrol.errors import ConfigError
from jaxcontrol.pipeline import AdapterInput, ControlInput, Pipeline

COLLECTIVES = ("collective-permute", "all-gather", "all-to-all", "all-reduce", "reduce-scatter")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_CONVOLUTION = re.compile(r"\sconvolution\(")
BATCH = 8
PROMPTS = [f"a {c} circle on a {b} background" for c in ("red", "green", "blue", "yellow")
           for b in ("white", "black")]


# ------------------------------------------------------------------------------------------------
# reading optimised HLO text
# ------------------------------------------------------------------------------------------------


def computations(hlo: str) -> dict[str, list[str]]:
    """The module's computations: name -> instruction lines. A computation starts with a line at
    column 0 ending in "{" (`%name (params) -> type {`, or `ENTRY %name ...`) and ends at "}"."""
    out, name = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            words = line.split()
            name = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            out[name].append(line)
    return out


def closure(comps: dict, root: str) -> set[str]:
    """`root` and every computation it calls, however deep (fusions, reductions, nested loops,
    conditionals: any `%name` of a computation on an instruction line)."""
    seen, todo = set(), [root]
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        for line in comps[c]:
            todo += [n for n in re.findall(r"%([\w.\-]+)", line.split("=", 1)[-1]) if n in comps and n not in seen]
    return seen


def while_bodies(hlo: str) -> list[str]:
    """The body computation of every while loop of the module."""
    return re.findall(r"\swhile\(.*?\bbody=%?([\w.\-]+)", hlo)


def loop_collectives(hlo: str) -> tuple[dict, int]:
    """Per while body: the collectives in it and in what it calls ({body: {op: count}}, bodies
    without any left out); and how many of the bodies run a convolution (the U-Net's loop)."""
    comps = computations(hlo)
    found, model_loops = {}, 0
    for body in while_bodies(hlo):
        lines = [ln for c in closure(comps, body) for ln in comps[c]]
        model_loops += any(_CONVOLUTION.search(ln) for ln in lines)
        ops = [m.group(1) for ln in lines for m in [_COLLECTIVE.search(ln)] if m]
        if ops:
            found[body] = {op: ops.count(op) for op in sorted(set(ops))}
    return found, model_loops


def test_the_hlo_reader_finds_collectives_in_a_loop_body():
    """The reader itself: a sharded scan whose step reverses the batch must show a
    collective-permute in its body; one that stays per sample shows none."""
    mesh = Mesh(np.asarray(jax.devices()[:BATCH]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.device_put(jnp.ones((BATCH, 4)), sharding)

    def run(step):
        return jax.jit(lambda x: jax.lax.scan(lambda c, _: (step(c), None), x, None, length=3)[0],
                       out_shardings=sharding).lower(x).compile().as_text()

    moved, loops = loop_collectives(run(lambda c: c[::-1] * 2.0))
    assert loops == 0 and moved and "collective-permute" in str(moved)
    assert loop_collectives(run(lambda c: c * 2.0))[0] == {}


# ------------------------------------------------------------------------------------------------
# the branch layout
# ------------------------------------------------------------------------------------------------


def test_branches_are_laid_out_sample_major():
    """Row b * n + k of every input is sample b under branch k; a scalar t and the shared entries
    pass unchanged; each branch's prediction equals the model run on that branch alone."""
    b, n = 3, 3
    x = jnp.arange(b * 2, dtype=jnp.float32).reshape(b, 1, 1, 2)
    branches = [{"text": jnp.full((b, 5, 4), 10.0 * k) + jnp.arange(b)[:, None, None],
                 "control": (jnp.full((b, 2, 2, 1), 100.0 * k),)} for k in range(n)]
    seen = {}

    def model(x, t, cond):
        seen.update(x=x, t=t, cond=cond)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])[:, None, None, None]
        return x * (1 + cond["text"][:, :1, :2].reshape(x.shape)) + cond["control"][0][:, :1, :1] + t

    t = jnp.asarray([5.0, 6.0, 7.0])
    preds = G.evaluate_branches(model, x, t, branches, {"step": "shared"})
    rows = [(s, k) for s in range(b) for k in range(n)]
    np.testing.assert_array_equal(seen["x"], np.stack([x[s] for s, _ in rows]))
    np.testing.assert_array_equal(seen["t"], np.asarray([t[s] for s, _ in rows]))
    np.testing.assert_array_equal(seen["cond"]["text"], np.stack([branches[k]["text"][s] for s, k in rows]))
    np.testing.assert_array_equal(seen["cond"]["control"][0],
                                  np.stack([branches[k]["control"][0][s] for s, k in rows]))
    assert seen["cond"]["step"] == "shared"
    for k in range(n):
        np.testing.assert_array_equal(preds[k], model(x, t, branches[k]))
    assert G.evaluate_branches(model, x, 2.0, branches)[1].shape == x.shape  # scalar t stays scalar
    assert jnp.ndim(seen["t"]) == 0


def test_branches_of_another_shape_or_batch_are_named():
    x = jnp.zeros((2, 1, 1, 2))

    def model(x, t, c):
        return x

    with pytest.raises(ConfigError, match=r"entry \['text'\] has shapes \[\(2, 4\), \(2, 5\)\]"):
        G.evaluate_branches(model, x, 0.0, [{"text": jnp.zeros((2, 4))}, {"text": jnp.zeros((2, 5))}])
    with pytest.raises(ConfigError, match=r"entry \['mask'\] .* must be \(2, \.\.\.\)"):
        G.evaluate_branches(model, x, 0.0, [{"mask": jnp.zeros((1,))}, {"mask": jnp.zeros((1,))}])
    with pytest.raises(ConfigError, match="same structure"):
        G.evaluate_branches(model, x, 0.0, [{"text": jnp.zeros((2, 4))}, {"label": jnp.zeros((2, 4))}])


# ------------------------------------------------------------------------------------------------
# the pipeline's sampling loop on 8 devices
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < BATCH:
        pytest.skip(f"needs {BATCH} devices (tests/conftest.py simulates them on the CPU)")
    return Mesh(np.asarray(jax.devices()[:BATCH]), ("data",))


@pytest.fixture(scope="module")
def built():
    if not demo.is_built():
        pytest.skip("the embedded model is not installed")


def test_cfg_sampling_loop_has_no_collectives(built, mesh):
    """Text-to-image with CFG (and guidance rescale) over 8 images, one per device."""
    pipe = Pipeline.from_pretrained(demo.DEFAULT_MODEL, mesh=mesh)
    hlo = pipe.lower(PROMPTS, num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.5,
                     output_type="latent").compile().as_text()
    moved, model_loops = loop_collectives(hlo)
    assert model_loops >= 1, "no while loop runs the U-Net: the sampler's scan was not found"
    assert moved == {}, f"collectives inside the sampling loop: {moved}"


def test_controlnet_adapter_cfg_sampling_loop_has_no_collectives(built, mesh):
    """The embedded ControlNet (and T2I-Adapter when built) with CFG in guess mode: control
    images, adapter features and guess mode's per-branch control mask follow the branch layout."""
    pipe = demo.load_embedded(mesh=mesh)
    cond = demo.circle_outline(64).astype(np.float32) / 255.0
    controls = [ControlInput(np.stack([np.roll(cond, 2 * i, axis=1) for i in range(BATCH)]), 0.8)]
    adapters = [AdapterInput(cond, 0.7)] if pipe.adapters else []
    hlo = pipe.lower(PROMPTS, num_inference_steps=3, guidance_scale=5.0, controls=controls, adapters=adapters,
                     guess_mode=True, output_type="latent").compile().as_text()
    moved, model_loops = loop_collectives(hlo)
    assert model_loops >= 1, "no while loop runs the U-Net: the sampler's scan was not found"
    assert moved == {}, f"collectives inside the sampling loop: {moved}"
