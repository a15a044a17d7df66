"""SAEs in and out of SAELens and EleutherAI sparsify layouts (issue 16, item 13), against the real packages
(`sae-lens`, `eai-sparsify`, installed by .ci/run): our exports load there with the same codes and
reconstructions, their folders import here with the same codes, and `safesail saes import|export` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safesail.cli import main
from safesail.config import compose
from safesail.errors import UserError
from safesail.saes import SAEConfig, build_sae, load_sae
from safesail.saes.interop import our_hook
from safesail.saes.saelens import export_saelens, load_saelens
from safesail.saes.sparsify_layout import export_sparsify, load_sparsify

sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is installed by .ci/run")
sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is installed by .ci/run")

D, N, K = 32, 128, 8
HOOK = "layers.1.mlp_out"


def _ours(arch: str, **kw):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch=arch, d_in=D, n_latents=N, hook=HOOK, model="tiny", normalize=False,
                              b_dec_init="zeros", **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.full((N,), 0.2).log())
    return sae.eval()


def _x(n=64):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1)) * 2


def _sparsify_dense(sc, x):
    out = sc.encode(x)
    return torch.zeros(x.shape[0], sc.num_latents).scatter_(-1, out.top_indices, out.top_acts)


@pytest.mark.parametrize("arch", ["topk", "matryoshka_topk"])
def test_sparsify_loads_our_topk_export(tmp_path, arch):
    from sparsify import SparseCoder

    sae = _ours(arch, k=K)
    export_sparsify(sae, tmp_path / "layers.1.mlp")
    cfg = json.loads((tmp_path / "layers.1.mlp" / "cfg.json").read_text())
    assert cfg["expansion_factor"] == N // D and cfg["num_latents"] == N and cfg["d_in"] == D
    sc = SparseCoder.load_from_disk(tmp_path / "layers.1.mlp")
    x = _x()
    with torch.no_grad():
        z = sae.encode(x)
        assert torch.allclose(_sparsify_dense(sc, x), z, atol=1e-5)
        out = sc.encode(x)
        assert torch.allclose(sc.decode(out.top_acts, out.top_indices), sae.decode(z), atol=1e-4)
    assert set(SparseCoder.load_many(str(tmp_path), local=True)) == {"layers.1.mlp"}


@pytest.mark.parametrize("num_latents", [N, 0])
def test_a_sparsify_folder_imports_with_the_same_codes(tmp_path, num_latents):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(2)
    sc = SparseCoder(D, SparseCoderConfig(num_latents=num_latents, expansion_factor=N // D, k=K))
    with torch.no_grad():
        sc.encoder.bias.normal_(0, 0.1)
        sc.b_dec.normal_(0, 0.5)
    sc.save_to_disk(tmp_path / "layers.1.mlp")
    ours = load_sparsify(tmp_path / "layers.1.mlp", hook=HOOK, model="tiny")
    x = _x()
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), _sparsify_dense(sc, x), atol=1e-5)
        out = sc.encode(x)
        assert torch.allclose(ours(x), sc.decode(out.top_acts, out.top_indices), atol=1e-4)


def test_sparsify_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(UserError, match="only TopK"):
        export_sparsify(_ours("relu"), tmp_path / "x")
    from sparsify import SparseCoder, SparseCoderConfig

    SparseCoder(D, SparseCoderConfig(num_latents=N, k=K, activation="groupmax")).save_to_disk(tmp_path / "g")
    with pytest.raises(UserError, match="groupmax"):
        load_sparsify(tmp_path / "g")


@pytest.mark.parametrize("arch, kw", [("topk", {"k": K}), ("jumprelu", {}), ("relu", {}),
                                      ("matryoshka_topk", {"k": K})])
def test_saelens_loads_our_export(tmp_path, arch, kw):
    from sae_lens import SAE

    sae = _ours(arch, **kw)
    export_saelens(sae, tmp_path / "s")
    theirs = SAE.load_from_disk(str(tmp_path / "s"))
    x = _x()
    with torch.no_grad():
        z = sae.encode(x)
        assert torch.allclose(theirs.encode(x), z, atol=1e-5)
        assert torch.allclose(theirs.decode(z), sae.decode(z), atol=1e-4)
    back = load_saelens(tmp_path / "s", hook=HOOK, model="tiny")  # and round-trips into ours
    with torch.no_grad():
        assert back.cfg.arch == arch.removeprefix("matryoshka_") and torch.allclose(back.encode(x), z, atol=1e-5)


@pytest.mark.parametrize("which", ["topk", "jumprelu", "standard-no-b_dec-input", "topk-rescaled"])
def test_a_saelens_folder_imports_with_the_same_codes(tmp_path, which):
    import sae_lens as sl

    torch.manual_seed(3)
    if which.startswith("topk"):
        theirs = sl.TopKSAE(sl.TopKSAEConfig(d_in=D, d_sae=N, k=K,
                                             rescale_acts_by_decoder_norm=which == "topk-rescaled"))
    elif which == "jumprelu":
        theirs = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D, d_sae=N))
    else:
        theirs = sl.StandardSAE(sl.StandardSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False))
    with torch.no_grad():
        theirs.W_enc.normal_(0, 0.3)
        theirs.W_dec.normal_(0, 0.3)
        theirs.b_enc.normal_(0, 0.1)
        theirs.b_dec.normal_(0, 0.5)
        if which == "jumprelu":
            theirs.threshold.fill_(0.3)
    theirs.cfg.metadata.hook_name = "blocks.1.hook_mlp_out"
    theirs.save_model(tmp_path / "s")
    ours = load_saelens(tmp_path / "s", hook=HOOK, model="tiny")
    x = _x()
    with torch.no_grad():
        z = theirs.encode(x)
        assert torch.allclose(ours.encode(x), z, atol=1e-4)
        assert torch.allclose(ours(x), theirs.decode(z), atol=1e-3)


def test_hook_names_of_other_tools():
    assert our_hook("blocks.7.hook_mlp_out") == "layers.7.mlp_out"
    assert our_hook("blocks.7.hook_resid_post") == "layers.7.resid"
    assert our_hook("model.layers.7.mlp.down_proj") == our_hook("layers.7.mlp") == "layers.7.mlp_out"
    assert our_hook("layers.7") == "layers.7.resid" and our_hook("ckpt_layer17.pt") == "layers.17.mlp_out"
    assert our_hook("blocks.7.attn.hook_z") is None


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = 0
    try:
        main(list(argv))
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_import_then_export_in_every_layout(tmp_path, capsys):
    from sparsify import SparseCoder, SparseCoderConfig

    run = ["experiment=smoke", f"run.root={tmp_path / 'runs'}", "device=cpu"]
    src = tmp_path / "third_party"
    torch.manual_seed(4)
    SparseCoder(64, SparseCoderConfig(num_latents=256, k=K)).save_to_disk(src / "layers.1.mlp")
    SparseCoder(64, SparseCoderConfig(num_latents=256, k=K)).save_to_disk(src / "layers.3.mlp")
    code, out, err = _cli(capsys, "saes", "import", "--format", "sparsify", str(src), *run)
    assert code == 0, err
    imported = tmp_path / "runs" / "smoke" / "saes"
    folders = sorted(p.relative_to(imported).as_posix() for p in imported.glob("*/*") if p.is_dir())
    assert folders == ["layers.1.mlp_out/sparsify-topk-k8", "layers.3.mlp_out/sparsify-topk-k8"]
    sae = load_sae(imported / folders[0])
    assert sae.cfg.model == compose(run).model.name and sae.cfg.hook == "layers.1.mlp_out"
    assert "select.override" in out
    # Importing the same files again changes nothing; other weights under that name are refused.
    assert _cli(capsys, "saes", "import", "--format", "sparsify", str(src), *run)[0] == 0
    SparseCoder(64, SparseCoderConfig(num_latents=256, k=K)).save_to_disk(src / "layers.1.mlp")
    code, _, err = _cli(capsys, "saes", "import", "--format", "sparsify", str(src / "layers.1.mlp"), *run)
    assert code == 2 and "already holds another SAE" in err

    for fmt in ("saelens", "sparsify", "safesail"):
        code, out, err = _cli(capsys, "saes", "export", "--format", fmt, *run)
        assert code == 0, err
    export = tmp_path / "runs" / "smoke" / "export" / "saes"
    assert set(SparseCoder.load_many(str(export / "sparsify"), local=True)) == {"layers.1.mlp", "layers.3.mlp"}
    from sae_lens import SAE

    SAE.load_from_disk(str(export / "saelens" / "layers.1.mlp_out" / "sparsify-topk-k8"))
    assert sorted(p.name for p in (export / "safesail").iterdir()) == ["ckpt_layer1.pt", "ckpt_layer3.pt"]
    code, _, err = _cli(capsys, "saes", "import", "--format", "safesail", str(export / "safesail" / "ckpt_layer3.pt"),
                        "--name", "from-ckpt", "--k", str(K), *run)
    assert code == 0, err
    back = load_sae(imported / "layers.3.mlp_out" / "from-ckpt")
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert torch.allclose(back.encode(x), load_sae(imported / folders[1]).encode(x), atol=1e-5)


@pytest.mark.parametrize("argv, words", [
    (["saes", "import", "--format", "gguf", "x"], "bad arguments"),
    (["saes", "import", "--format", "saelens", "/no/such/folder"], "does not exist"),
    (["saes"], "say what to do"),
])
def test_cli_bad_input_is_one_sentence(tmp_path, capsys, argv, words):
    code, _, err = _cli(capsys, *argv, "experiment=smoke", f"run.root={tmp_path}")
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
