"""Pan & Rajan's decomposition: voting, the V_c/V_uc head, CI/TI/MC-BLN on tiny trained
models, the Jaccard index, top-k and the Table 1 report."""

from __future__ import annotations

import pytest
import torch
from test_replacement import trained_model  # noqa: F401  (fixture)

from dnnmod.approaches import run_approach
from dnnmod.approaches.pan_rajan import (
    backtrack,
    decomposition_cost,
    negative_rates,
    tangling_sample,
)
from dnnmod.cli import main
from dnnmod.errors import ArtifactError, ConfigError
from dnnmod.modules.combination import combine_scores
from dnnmod.modules.extract import extract_module
from dnnmod.modules.heads import ConcernVotesHead
from dnnmod.modules.masking import masked_logits
from dnnmod.modules.metrics import model_module_jaccard, top_k_accuracy
from dnnmod.modules.moduleset import ModuleSet
from dnnmod.report.pan_rajan import decomposition_table
from dnnmod.training.model_io import load_model


def test_voting_one_vote_several_votes_and_none():
    classes = [3, 5, 7]
    scores = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [5.0, 6.0]],   # one vote: class 3, despite 7's higher V_c
        [[1.0, 0.0], [2.0, 1.0], [9.0, 10.0]],  # votes 3 and 5: highest V_c among voters, 5
        [[1.0, 2.0], [3.0, 4.0], [2.0, 3.0]],   # no vote: highest V_c of all, 5
    ])
    assert combine_scores("voting", scores, classes).tolist() == [3, 5, 5]
    with pytest.raises(ArtifactError, match="'voting' takes"):
        combine_scores("voting", scores[..., 0], classes)


def test_concern_votes_head_is_the_two_node_output_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    features = torch.randn(5, 6)
    logits = layer(features)
    head = ConcernVotesHead([2, 0], 4)
    scores = head(logits.expand(2, -1, -1))  # the same logits for both modules
    others = [0, 1, 3]
    v_uc = features @ layer.weight[others].mean(0) + layer.bias[others].mean()
    assert torch.allclose(scores[:, 0, 0], logits[:, 2])
    assert torch.allclose(scores[:, 0, 1], v_uc, atol=1e-6)
    assert torch.allclose(head.for_module(0)(logits), scores[:, 0])
    assert head.subset([1]).classes == [0]
    with pytest.raises(ArtifactError, match="at least 2"):
        ConcernVotesHead([0], 1)


def test_top_k_accuracy_and_jaccard():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.08, 0.02]])
    labels = torch.tensor([2, 2])
    assert top_k_accuracy(scores, [0, 1, 2], labels, 1) == 0.0
    assert top_k_accuracy(scores, [0, 1, 2], labels, 2) == 50.0
    assert top_k_accuracy(scores, [0, 1, 2], labels, 5) == 100.0
    with pytest.raises(ConfigError, match="label 9"):
        top_k_accuracy(scores, [0, 1, 2], torch.tensor([9, 9]), 2)


@pytest.fixture(scope="module")
def resnet(trained_model):  # noqa: F811
    return load_model(trained_model("resnet20", 4))


def test_ci_alone_leaves_each_module_exact_on_its_own_training_images(resnet, small_digits):
    """Switched-off positions were 0 on every concerned image, so module c computes the
    model's logits on class c's training images (also through residual additions)."""
    model, meta = resnet
    modules = run_approach("pan_rajan", model, meta, small_digits,
                           {"tangling": False, "backtracking": False}, seed=0)
    assert any(mask.dim() == 4 and not mask.all() for mask in modules.masks.values())
    for position in (0, 4):
        own = small_digits.train.subset([position], relabel=False)
        x, _ = own.float_batch()
        masks = {name: mask[position:position + 1] for name, mask in modules.masks.items()}
        with torch.no_grad():
            assert torch.allclose(masked_logits(model, modules.structure, masks, x)[0],
                                  model(x), atol=1e-4)


def test_tangling_switches_positions_back_on(resnet, small_digits):
    model, meta = resnet
    ci = run_approach("pan_rajan", model, meta, small_digits,
                      {"tangling": False, "backtracking": False}, seed=0)
    ti = run_approach("pan_rajan", model, meta, small_digits, {"backtracking": False}, seed=0)
    strict = run_approach("pan_rajan", model, meta, small_digits,
                          {"backtracking": False, "tangling_rate": 0.5}, seed=0)
    for name, mask in ci.masks.items():
        assert (ti.masks[name] >= mask).all() and (strict.masks[name] >= mask).all()
        assert (ti.masks[name] >= strict.masks[name]).all()
    assert sum(int(m.sum()) for m in ti.masks.values()) > sum(
        int(m.sum()) for m in ci.masks.values())
    jaccard = model_module_jaccard(ti)
    assert all(0 < j <= 1 for j in jaccard)
    assert sum(model_module_jaccard(ci)) < sum(jaccard)


def test_tangling_sample_is_one_to_one_and_evenly_split(small_digits):
    sample = tangling_sample(small_digits.train, seed=0)
    counts = torch.bincount(small_digits.train.labels, minlength=10).float()
    per_class = torch.bincount(sample.labels, minlength=10)
    expected = int(torch.ceil(counts.mean() / 9))
    assert (per_class == torch.clamp(counts.long(), max=expected)).all()
    rates = {"g": torch.tensor([[1.0], [0.0], [0.5]])}
    # module 0's negatives: classes 1 and 2 weighted by their counts
    assert negative_rates(rates, torch.tensor([2, 2, 6]))["g"][0].item() == pytest.approx(
        (0 * 2 + 0.5 * 6) / 8)


def test_backtracking_removes_units_that_only_feed_v_uc(trained_model, small_digits):  # noqa: F811
    model, meta = load_model(trained_model("simcnn", 1))
    off = run_approach("pan_rajan", model, meta, small_digits, {"backtracking": False}, seed=0)
    on = run_approach("pan_rajan", model, meta, small_digits, {}, seed=0)
    details = on.provenance["backtracking"]
    assert details["applied"] and details["node"] == "unit"
    group = details["group"]
    weight = dict(model.named_modules())[on.structure.output_layer].weight.detach().double()
    v_uc = (weight.sum(0, keepdim=True) - weight) / (weight.shape[0] - 1)
    only_v_uc = (weight <= 0) & (v_uc > 0) & (v_uc >= 0.5 * (weight.abs() + v_uc))
    assert only_v_uc.any()
    assert torch.equal(on.masks[group], off.masks[group] & ~only_v_uc)
    # the extracted module computes the masked model, hidden units removed physically
    x, _ = small_digits.test.float_batch(torch.arange(8))
    extracted = extract_module(model, on.structure, on.module_masks(3))
    with torch.no_grad():
        expected = masked_logits(model, on.structure,
                                 {n: m[3:4] for n, m in on.masks.items()}, x)[0]
        assert torch.allclose(extracted(x), expected, atol=1e-4)


def test_backtracking_skips_coupled_channels_unless_asked(resnet, small_digits):
    model, meta = resnet
    skipped = run_approach("pan_rajan", model, meta, small_digits, {}, seed=0)
    assert not skipped.provenance["backtracking"]["applied"]
    assert "coupled" in skipped.provenance["backtracking"]["reason"]
    active = {name: mask.clone() for name, mask in skipped.masks.items()}
    applied, details = backtrack(model, skipped.structure, active, 0.5, coupled=True)
    assert details["applied"] and details["node"] == "channel"
    assert all((applied[name] <= active[name]).all() for name in active)


def test_decomposition_cost_and_table_with_published_beside(resnet, small_digits, tmp_path):
    model, meta = resnet
    modules = run_approach("pan_rajan", model, meta, small_digits, {}, seed=0)
    path = tmp_path / "modules.safetensors"
    modules.save(path)
    loaded = ModuleSet.load(path, base=meta)
    assert loaded.combination == "voting" and loaded.head.kind == "concern_votes"
    record = decomposition_cost(model, meta, loaded, small_digits.test)
    assert record["composed_top5"] >= record["composed_top1"]
    assert record["model_top1"] - record["composed_top1"] == pytest.approx(
        record["top1_loss_pp"])
    assert "no dense backtracking" in record["note"] and "TI" not in record["note"]
    strict = run_approach("pan_rajan", model, meta, small_digits, {"tangling_rate": 0.5}, seed=0)
    assert "at least 0.5 of the other classes' images" in decomposition_cost(
        model, meta, strict, small_digits.test)["note"]
    table = decomposition_table([record, {**record, "dataset": "cifar10", "seed": 1}])
    paper = table[table.dataset == "cifar10"].iloc[0]
    assert paper.published_composed_top1 == 88.5 and paper.published_jaccard == 0.75
    assert paper.published_model_top5 == 99.8
    assert pd_isna(table[table.dataset == "digits"].iloc[0].published_composed_top1)


def pd_isna(value) -> bool:
    return value is None or value != value


def test_cli_evaluate_decomposition_and_table(resnet, trained_model, data_root,  # noqa: F811
                                              small_digits, tmp_path):
    model, meta = resnet
    modules_path = tmp_path / "modules.safetensors"
    run_approach("pan_rajan", model, meta, small_digits, {}, seed=0).save(modules_path)
    cost = tmp_path / "cost.json"
    assert main(["evaluate-decomposition", "--modules", str(modules_path), "--model",
                 str(trained_model("resnet20", 4)), "--data-root", str(data_root),
                 "--device", "cpu", "--out", str(cost)]) == 0
    out = tmp_path / "tables" / "pan_rajan_decomposition.csv"
    assert main(["table", "pan-rajan", "--costs", str(cost), "--out", str(out),
                 "--summary", str(tmp_path / "summary.json")]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert "composed_top5" in out.read_text()
