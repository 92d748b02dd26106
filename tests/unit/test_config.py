"""Config loading, overrides, validation errors for every stage's config, hashes."""

from __future__ import annotations

import dataclasses

import pytest

from u2seg.config import ConfigError, U2SegConfig, config_from_dict, explain, load_config
from u2seg.pipeline.stages import STAGES, stage

pytestmark = pytest.mark.unit

# One bad value per stage section (and the run section), with what the error must name.
BAD_VALUES = [
    ("run.run_root", "''", "run.run_root"),
    ("run.device", "tpu", "one of 'auto', 'cpu', 'cuda'"),
    ("run.seed", "-1", ">= 0"),
    ("run.max_error_fraction", "1.5", "a fraction in [0, 1]"),
    ("run.storage.anon", "maybe", "true or false"),
    ("manifest.rows_per_part", "0", "a positive integer"),
    ("manifest.inputs", "{a: 1}", "a list of str"),
    ("extract.tau", "abc", "a number"),
    ("extract.solver", "qr", "one of 'lanczos', 'dense'"),
    ("extract.n_masks", "0", "an integer in [1, 20]"),
    ("extract.image_size", "8", "an integer in [32, 2048]"),
    ("extract.refine", "crf", "one of 'none', 'guided'"),
    ("cluster.things_k", "0", "a positive integer"),
    ("cluster.refit", "sometimes", "one of 'assign_new', 'always'"),
    ("stuff.k", "1", "an integer in [2, 255]"),
    ("predict.rows_per_part", "0", "a positive integer"),
    ("extract.max_side", "10", "0 or an integer >= 64"),
    ("stuff.method", "crf", "one of 'stego', 'kmeans'"),
    ("stuff.batch_size", "1", ">= 2"),
    ("extract.descriptor", "cls", "one of 'crop_cls', 'mask_pool'"),
    ("label.thing_order", "size", "one of 'score', 'bbox_area'"),
    ("label.stuff_overlap_drop", "1.5", "null or a fraction in [0, 1]"),
    ("manifest.refresh", "often", "true or false"),
    ("run.lease_s", "1", ">= 5 seconds"),
    ("cluster.niter", "2.5", "an integer"),
    ("cluster.spherical", "3", "true or false"),
    ("label.stuff_smooth", "4", "0, 1 or an odd integer > 1"),
    ("label.min_stuff_area", "2", "a fraction in [0, 1]"),
    ("train.num_workers", "0", "a positive integer"),
    ("train.lr", "-0.1", "> 0"),
    ("train.use_gpu", "sometimes", "one of 'auto', 'yes', 'no'"),
    ("evaluate.protocols", "[]", "a non-empty list of distinct protocols"),
    ("evaluate.report_images", "-3", ">= 0"),
]


@pytest.mark.parametrize(("key", "raw", "allowed"), BAD_VALUES)
def test_bad_value_names_key_value_and_rule(key, raw, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={raw}"])
    msg = str(info.value)
    assert key in msg and allowed in msg
    assert info.value.key == key


def test_every_stage_section_is_covered_by_a_bad_value_test():
    covered = {k.split(".")[0] for k, _, _ in BAD_VALUES}
    sections = {section.split(".")[0] for st in STAGES for section in st.sections}
    assert {"run", *sections} <= covered


def test_unknown_key_is_rejected_with_the_known_keys():
    with pytest.raises(ConfigError, match="known key of extract"):
        load_config(None, ["extract.taux=0.1"])
    with pytest.raises(ConfigError, match="known key"):
        load_config(None, ["nosuchsection.x=1"])


def test_overrides_parse_yaml_values_and_coerce_ints_to_floats():
    cfg = load_config(None, ["extract.tau=0.2", "cluster.things_k=10", "train.lr=1", "run.ray_address=null",
                             "manifest.inputs=[a, b]", "manifest.inputs=/data/x"])
    assert cfg.extract.tau == 0.2 and cfg.cluster.things_k == 10
    assert isinstance(cfg.train.lr, float) and cfg.run.ray_address is None
    assert cfg.manifest.inputs == ["/data/x"]
    assert load_config(None, ["train.use_gpu=no"]).train.use_gpu == "no"
    assert load_config(None, ["train.use_gpu=yes"]).train.use_gpu == "yes"


def test_builtin_configs_load_and_differ():
    hashes = {name: load_config(name).hash() for name in ("demo", "coco", "imagenet")}
    assert len(set(hashes.values())) == 3
    assert load_config("demo").extract.backbone == "vit_small_patch8_224.dino"


def test_yaml_file_and_bad_yaml(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("extract:\n  tau: 0.3\n")
    assert load_config(str(good)).extract.tau == 0.3
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract: [unclosed\n")
    with pytest.raises(ConfigError, match="valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="existing YAML file"):
        load_config(str(tmp_path / "missing.yaml"))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(scalar))


def test_stage_hash_changes_downstream_only():
    base = U2SegConfig()
    changed = load_config(None, ["cluster.things_k=5"])
    for name in ("manifest", "extract"):
        assert stage(name).config_hash(base) == stage(name).config_hash(changed)
    for name in ("cluster", "label", "train", "predict", "evaluate", "evaluate_model"):
        assert stage(name).config_hash(base) != stage(name).config_hash(changed), name
    assert base.hash() != changed.hash()


def test_a_train_knob_leaves_the_labels_evaluation_alone_and_the_target_selects_only():
    base = U2SegConfig()
    trained = load_config(None, ["train.lr=0.5"])
    assert stage("evaluate").config_hash(base) == stage("evaluate").config_hash(trained)
    assert stage("evaluate_model").config_hash(base) != stage("evaluate_model").config_hash(trained)
    model = load_config(None, ["evaluate.target=model"])
    assert all(st.config_hash(base) == st.config_hash(model) for st in STAGES)


def test_where_progress_and_scalars_go_is_in_no_hash():
    base = U2SegConfig()
    watched = load_config(None, ["run.progress_every_s=1", "train.mlflow_uri=http://mlflow:5000"])
    assert watched.run.progress_every_s == 1.0 and base.run.progress_every_s == 30.0
    assert base.hash() == watched.hash() and all(st.config_hash(base) == st.config_hash(watched) for st in STAGES)
    with pytest.raises(ConfigError, match=r"run\.progress_every_s"):
        load_config(None, ["run.progress_every_s=-1"])


def test_secrets_are_redacted_and_excluded_from_hash():
    a = load_config(None, ["run.storage.secret=topsecret", "run.storage.key=AKIA"])
    assert "topsecret" not in a.to_yaml() and "AKIA" not in a.to_yaml()
    assert a.hash() == U2SegConfig().hash()


def test_round_trip_through_dict_and_explain_documents_every_knob():
    cfg = load_config("demo")
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg
    text = explain()
    for section in ("run.", "manifest.", "extract.", "cluster.", "label.", "train.", "evaluate."):
        assert section in text
    assert "extract.tau = 0.15" in text


def test_evaluate_protocols_default_validation_and_hash():
    assert U2SegConfig().evaluate.protocols == ["hungarian", "u2seg"]
    assert load_config(None, ["evaluate.protocols=u2seg"]).evaluate.protocols == ["u2seg"]
    assert load_config(None, ["evaluate.protocols=[majority, hungarian]"]).evaluate.protocols == ["majority",
                                                                                                 "hungarian"]
    with pytest.raises(ConfigError, match="distinct"):
        load_config(None, ["evaluate.protocols=[u2seg, u2seg]"])
    with pytest.raises(ConfigError, match="one of 'hungarian', 'majority', 'u2seg'") as info:
        load_config(None, ["evaluate.protocols=[greedy]"])
    assert info.value.key == "evaluate.protocols[0]"
    with pytest.raises(ConfigError, match="known key of evaluate"):  # the knob it replaced is gone
        load_config(None, ["evaluate.matching=hungarian"])
    other = load_config(None, ["evaluate.protocols=[hungarian]"])
    assert stage("evaluate").config_hash(other) != stage("evaluate").config_hash(U2SegConfig())
    assert stage("label").config_hash(other) == stage("label").config_hash(U2SegConfig())
