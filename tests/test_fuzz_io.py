"""Fuzz cases for the I/O side (issue 15): saved models, checkpoints, the CLI, and interrupted saves.

Every case asserts its exact outcome: the error type and a message naming the problem, or the correct result.
Saved models are forged with a valid checksum where a case must reach the validation behind the checksum.
"""
import contextlib
import copy
import errno
import json
import os
import shutil
import subprocess
import sys
import time
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mass
from mass.files.checkpoints import CheckpointError, open_finetuned
from mass.tools.cli.main import main
from mass.files.openclip import openclip_to_hf
from mass.storage.saved_format import SavedModelError, router_config
from mass.storage.serialization import LEGACY_CONFIG_NAME, LEGACY_TENSORS_NAME, MODEL_NAME, content_sha256, read_saved

from conftest import build_model, make_setup

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model():
    pretrained, finetuned, _ = make_setup("hf")
    gen = torch.Generator().manual_seed(7)
    heads = {f"task{i}": torch.randn(3 + i, 32, generator=gen) for i in range(3)}
    return mass.merge(pretrained, finetuned, router=mass.RouterConfig(layer=2, threshold=0.1), heads=heads,
                      progress=False)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """(config dict, tensors) of the saved model, and its directory (never modified: copy it)."""
    directory = tmp_path_factory.mktemp("saved") / "m"
    model.save_pretrained(directory)
    with safe_open(str(directory / MODEL_NAME), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return config, tensors, directory


def forge(directory: Path, config, tensors, checksum=True) -> Path:
    """A format-2 file with ``config`` (dict or raw text) and a valid checksum (unless told otherwise)."""
    text = config if isinstance(config, str) else json.dumps(config)
    directory.mkdir(parents=True, exist_ok=True)
    digest = content_sha256(text, tensors) if checksum else "0" * 64
    save_file(tensors, str(directory / MODEL_NAME),
              metadata={"format": "mass", "format_version": "2", "config": text, "sha256": digest})
    return directory


def forge_v1(directory: Path, config: dict, tensors) -> Path:
    """A directory as format 1 wrote it: config JSON beside the tensors, the tensors' SHA-256 in the config."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / LEGACY_TENSORS_NAME), metadata={"format": "mass", "version": "1"})
    digest = hashlib.sha256((directory / LEGACY_TENSORS_NAME).read_bytes()).hexdigest()
    v1 = {**{k: v for k, v in config.items() if k != "task_digests"}, "format_version": 1, "tensors_sha256": digest}
    (directory / LEGACY_CONFIG_NAME).write_text(json.dumps(v1))
    return directory


def assert_same_model(loaded, reference):
    """Bit-exact: config, every stored tensor, heads."""
    assert loaded.tasks == reference.tasks and loaded.router_config == reference.router_config
    assert_same_artifact((loaded.decomposition(), {t: loaded.head(t) for t in loaded.tasks}), reference)


def assert_same_artifact(artifact, reference):
    """A (decomposition, heads) pair equal bit for bit to what ``reference`` stores."""
    b, heads = artifact
    a = reference.decomposition()
    assert b.tasks == reference.tasks
    assert a.base.keys() == b.base.keys() and a.lowrank.keys() == b.lowrank.keys() and a.dense.keys() == b.dense.keys()
    assert all(torch.equal(a.base[k], b.base[k]) for k in a.base)
    assert all(torch.equal(getattr(a.lowrank[k], p), getattr(b.lowrank[k], p)) for k in a.lowrank for p in "USV")
    assert all(torch.equal(a.dense[k], b.dense[k]) for k in a.dense)
    assert all(torch.equal(reference.head(t), heads[t]) for t in reference.tasks)


_RELEASER = """
import os, sys, time
time.sleep(float(sys.argv[1]))
for _ in range(300):
    for fifo in sys.argv[2:]:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    time.sleep(0.1)
"""


@contextlib.contextmanager
def released_if_stuck(fifos, seconds=20.0):
    """Yield a function telling whether the block ran in under ``seconds``. If the code under test blocks
    opening one of ``fifos``, a helper process releases it after ``seconds`` (it opens each FIFO for writing and
    closes it, so the reader sees end-of-file), so that a regression fails the test instead of hanging the
    suite. A thread cannot do this: the blocked open may hold the GIL (safetensors' does)."""
    helper = subprocess.Popen([sys.executable, "-c", _RELEASER, str(seconds), *map(str, fifos)]) if fifos else None
    start = time.monotonic()
    try:
        yield lambda: time.monotonic() - start < seconds
    finally:
        if helper is not None:
            helper.kill()
            helper.wait()


# ---------------------------------------------------------------------------------------------- saved configs
def _set(path, value):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def _delete(path):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        del node[last]
    return edit


def _first_rank(config, value):
    config["ranks"][next(iter(config["ranks"]))] = value


CONFIG_CASES = [
    ("layer_bool", _set("router.layer", True), r"'router\.layer' must be an int or null, got True \(bool\)"),
    ("reuse_prefix_string", _set("reuse_prefix", "false"), r"'reuse_prefix' must be a bool, got 'false'"),
    ("has_heads_int", _set("has_heads", 1), r"'has_heads' must be a bool"),
    ("unknown_top", _set("extra", 1), r"unknown field\(s\) 'extra'"),
    ("unknown_router", _set("router.colour", "red"), r"unknown field\(s\) 'router\.colour'"),
    ("missing_top", _delete("keep_merged"), r"missing field\(s\) 'keep_merged'"),
    ("missing_router", _delete("router.norm"), r"missing field\(s\) 'router\.norm'"),
    ("version_3", _set("format_version", 3), r"unsupported format_version 3"),
    ("version_string", _set("format_version", "2"), r"unsupported format_version '2'"),
    ("version_1_in_v2_file", _set("format_version", 1), r"missing field\(s\) 'tensors_sha256'"),
    ("temperature_string", _set("router.temperature", "1.0"), r"'router\.temperature' must be a number"),
    ("threshold_range", _set("router.threshold", 1.5), r"'router' is invalid: .*threshold"),
    ("mode_bogus", _set("router.mode", "bogus"), r"'router' is invalid: .*mode"),
    ("layer_negative", _set("router.layer", -1), r"'router' is invalid: .*layer"),
    ("layers_bool", _set("router.layers", [1, True]), r"'router\.layers' must be a list of ints"),
    ("tasks_duplicate", _set("tasks", ["task0", "task0", "task2"]), r"'tasks' names a task twice"),
    ("tasks_not_strings", _set("tasks", ["task0", 1, "task2"]), r"'tasks' must be a non-empty list of non-empty"),
    ("tasks_empty", _set("tasks", []), r"'tasks' must be a non-empty list"),
    ("tasks_too_few", _set("tasks", ["task0", "task1"]), r"'task_digests' must name exactly the tasks .*extra \['task2'\]"),
    ("tasks_too_few_digests_too", lambda c: (c.update(tasks=["task0", "task1"]), c["task_digests"].pop("task2"),
                                              c.update(has_heads=False)),
     r"'tasks' lists 2 tasks \['task0', 'task1'\] but the saved tensors hold 3 \(the first dimension of lowrank/"),
    ("tasks_renamed", _set("tasks", ["task0", "task1", "other"]),
     r"'task_digests' must name exactly the tasks .*missing \['other'\], extra \['task2'\]"),
    ("tasks_renamed_digests_too", lambda c: (c.update(tasks=["task0", "task1", "other"]),
                                             c["task_digests"].update(other=c["task_digests"].pop("task2"))),
     r"'tasks' does not match the saved heads .*tasks without a head \['other'\], heads of no listed task \['task2'\]"),
    ("task_digest_not_hex", lambda c: c["task_digests"].update(task1="xyz"), r"'task_digests' must hold a SHA-256 .*\['task1'\]"),
    ("rank_wrong", lambda c: _first_rank(c, 999), r"lowrank/.*rank=999"),
    ("rank_zero", lambda c: _first_rank(c, 0), r"'ranks\..*' must be an int >= 1"),
    ("rank_missing", lambda c: c["ranks"].pop(next(iter(c["ranks"]))), r"'ranks' lacks the matrix"),
    ("rank_extra", lambda c: c["ranks"].update({"nope.weight": 2}), r"'ranks' names matrices .*nope\.weight"),
    ("keep_merged_bad", _set("keep_merged", "none"), r"'keep_merged' must be one of"),
    ("architecture_bad", _set("architecture", "resnet"), r"'architecture' must be one of"),
    ("storage_factor_edited", _set("storage_factor", 1.5), r"'storage_factor' is 1\.5 but the tensors give"),
    ("storage_factor_string", _set("storage_factor", "2"), r"'storage_factor' must be a number"),
    ("has_heads_false", _set("has_heads", False), r"'has_heads' is false but the tensors hold heads"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_saved_config_is_validated_behind_the_checksum(saved, tmp_path, edit, message):
    config, tensors, _ = saved
    config = copy.deepcopy(config)
    edit(config)
    forge(tmp_path / "m", config, tensors)
    with pytest.raises(SavedModelError, match=message):
        read_saved(tmp_path / "m")


@pytest.mark.parametrize("text,message", [
    ('{"format_version": 2, "tasks": [}', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"format_version": 2, "format_version": 2}', r"duplicate field\(s\) \['format_version'\]"),
    ("CONFIG_WITH_NAN", "NaN is not a JSON number"),
], ids=["not_json", "array", "duplicate_key", "nan"])
def test_saved_config_text_is_parsed_strictly(saved, tmp_path, text, message):
    config, tensors, _ = saved
    if text == "CONFIG_WITH_NAN":
        text = json.dumps({**config, "router": {**config["router"], "temperature": float("nan")}})
    forge(tmp_path / "m", text, tensors)
    with pytest.raises(SavedModelError, match=message):
        read_saved(tmp_path / "m")


def _drop_v(tensors):
    key = next(k for k in tensors if k.endswith("/V"))
    return {k: v for k, v in tensors.items() if k != key}


def _nan_in_factor(tensors):
    key = next(k for k in tensors if k.endswith("/S"))
    bad = tensors[key].clone()
    bad[0, 0] = float("nan")
    return {**tensors, key: bad}


TENSOR_CASES = [
    ("nan", _nan_in_factor, r"lowrank/.*/S' contains NaN or Inf"),
    ("extra_tensor", lambda t: {**t, "junk/x": torch.zeros(1)}, r"unexpected tensor 'junk/x'"),
    ("bad_part", lambda t: {**t, "lowrank/a.weight/W": torch.zeros(1)}, r"unexpected tensor 'lowrank/a\.weight/W'"),
    ("missing_part", _drop_v, r"lacks part\(s\) \['V'\]"),
    ("missing_head", lambda t: {k: v for k, v in t.items() if k != "heads/task1"}, r"'tasks' does not match the saved heads"),
    ("int_head", lambda t: {**t, "heads/task1": torch.zeros(4, 32, dtype=torch.int64)}, r"heads/task1 must be a 2-D floating"),
    ("no_base", lambda t: {k: v for k, v in t.items() if not k.startswith("base/")}, r"no pretrained weights"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES])
def test_saved_tensors_are_checked_against_the_config(saved, tmp_path, edit, message):
    config, tensors, _ = saved
    forge(tmp_path / "m", config, edit(dict(tensors)))
    with pytest.raises(SavedModelError, match=message):
        read_saved(tmp_path / "m")


def test_the_checksum_covers_the_config(saved, tmp_path):
    """A reordered task list would run one task's blocks under another's head: the checksum refuses it."""
    config, tensors, _ = saved
    reordered = {**config, "tasks": [config["tasks"][i] for i in (1, 0, 2)]}
    forge(tmp_path / "m", reordered, tensors, checksum=False)
    with pytest.raises(SavedModelError, match="truncated or corrupted"):
        read_saved(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / MODEL_NAME), framework="pt") as f:
        metadata = f.metadata()
    # the same edit with the old checksum: the file's checksum was computed over the original config
    save_file(tensors, str(tmp_path / "m" / MODEL_NAME),
              metadata={**metadata, "sha256": content_sha256(json.dumps(config), tensors)})
    with pytest.raises(SavedModelError, match="truncated or corrupted"):
        read_saved(tmp_path / "m")


@pytest.mark.parametrize("case,message", [
    ("plain_safetensors", "not a MASS model file"),
    ("metadata_version", "unsupported format_version '3'"),
    ("no_checksum", "lacks the config or checksum"),
    ("is_a_file", "not a directory"),
    ("empty_dir", f"has no {MODEL_NAME}"),
    ("missing_dir", "not a directory"),
    ("dangling_symlink", "no such file"),
])
def test_saved_files_that_are_not_models(saved, tmp_path, case, message):
    config, tensors, _ = saved
    target = tmp_path / "m"
    target.mkdir()
    if case == "plain_safetensors":
        save_file({"a": torch.zeros(2)}, str(target / MODEL_NAME))
    elif case == "metadata_version":
        save_file(tensors, str(target / MODEL_NAME), metadata={"format": "mass", "format_version": "3"})
    elif case == "no_checksum":
        save_file(tensors, str(target / MODEL_NAME), metadata={"format": "mass", "format_version": "2"})
    elif case == "is_a_file":
        target.rmdir()
        target.write_text("x")
    elif case == "missing_dir":
        target = tmp_path / "nowhere"
    elif case == "dangling_symlink":
        os.symlink(tmp_path / "gone", target / MODEL_NAME)
    with pytest.raises(SavedModelError, match=message):
        read_saved(target)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_the_saved_file_is_refused_not_read(tmp_path):
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / MODEL_NAME)
    with released_if_stuck([tmp_path / "m" / MODEL_NAME]) as in_time:
        with pytest.raises(SavedModelError, match="not a regular file"):
            read_saved(tmp_path / "m")
    assert in_time(), "reading a FIFO blocked"


# ---------------------------------------------------------------------------------------------- format 1
def test_format_1_loads_bit_exactly_only_when_trusted_with_a_warning_and_a_resave_upgrades_it(model, saved, tmp_path):
    """Format 1 binds nothing of the task order (no per-task digest, no task name on a stacked tensor, config
    outside any checksum): it is refused unless trusted, and then it warns."""
    config, tensors, _ = saved
    forge_v1(tmp_path / "m", config, tensors)
    base = build_model("hf", seed=9)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(SavedModelError, match=r"format-1 MASS model: .*task order is not bound to its tensors.* "
                                              r"trust_task_order=True"):
        mass.MASSModel.from_pretrained(tmp_path / "m", base_model=base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # the base model is as it was
    with pytest.warns(UserWarning, match=r"format-1 .*\(trust_task_order=True\)\. Call save_pretrained again"):
        loaded = mass.MASSModel.from_pretrained(tmp_path / "m", base_model=base, trust_task_order=True)
    assert_same_model(loaded, model)
    loaded.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [MODEL_NAME]
    assert_same_model(mass.MASSModel.from_pretrained(tmp_path / "m", base_model=build_model("hf")), model)


def test_format_1_without_the_later_router_fields_gets_their_old_defaults(saved, tmp_path):
    config, tensors, _ = saved
    old_router = {k: v for k, v in config["router"].items() if k not in ("layers", "features", "norm")}
    forge_v1(tmp_path / "m", {**config, "router": old_router}, tensors)
    with pytest.warns(UserWarning):
        got, _, _ = read_saved(tmp_path / "m", trust_task_order=True)
    assert (got["router"]["layers"], got["router"]["features"], got["router"]["norm"]) == (None, "merged", "l2")


@pytest.mark.parametrize("edit,message", [
    (_set("router.layer", True), r"'router\.layer' must be an int or null"),
    (_set("reuse_prefix", "false"), r"'reuse_prefix' must be a bool"),
    (_delete("architecture"), r"missing field\(s\) 'architecture'"),
    (_set("tensors_sha256", "0" * 64), "truncated or corrupted"),
], ids=["layer_bool", "reuse_prefix_string", "missing_field", "bad_checksum"])
def test_format_1_configs_are_validated_strictly_too(saved, tmp_path, edit, message):
    config, tensors, _ = saved
    forge_v1(tmp_path / "m", config, tensors)
    v1 = json.loads((tmp_path / "m" / LEGACY_CONFIG_NAME).read_text())
    edit(v1)
    (tmp_path / "m" / LEGACY_CONFIG_NAME).write_text(json.dumps(v1))
    with pytest.raises(SavedModelError, match=message):
        read_saved(tmp_path / "m", trust_task_order=True)


# ---------------------------------------------------------------------------------------------- saving
def _with_router_value(model, field, value):
    """The model's saved artifact with one router field forced to ``value`` (no RouterConfig check)."""
    router = copy.copy(model.router_config)
    object.__setattr__(router, field, value)  # bypasses RouterConfig's own checks (and a frozen dataclass)
    return dataclasses.replace(model.saved_artifact(), router=router)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", np.float32(0.5), r"'router\.temperature' must be a number, got .*float32"),
    ("temperature", float("nan"), r"'router\.temperature' must be a number, got nan"),
    ("layer", True, r"'router\.layer' must be an int or null"),
    ("threshold", 2.0, r"'router' is invalid: .*threshold"),
])
def test_a_config_that_a_load_would_refuse_is_refused_before_anything_is_written(
        model, saved, tmp_path, field, value, message):
    from mass.storage.serialization import save_artifact

    shutil.copytree(saved[2], tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(ValueError, match="cannot save this model: .*" + message):
        save_artifact(_with_router_value(model, field, value), tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    with pytest.raises(ValueError, match=message):
        save_artifact(_with_router_value(model, field, value), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_the_saved_router_fields_are_the_router_config_fields():
    """A RouterConfig field the format does not know would make every save fail: extend ROUTER_FIELDS with it."""
    assert set(mass.storage.saved_format.ROUTER_FIELDS) == {f.name for f in dataclasses.fields(mass.RouterConfig)}


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_the_mode_the_umask_gives(model, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "m" / MODEL_NAME).st_mode & 0o777) == mode


def test_saving_onto_a_file_is_refused(model, tmp_path):
    (tmp_path / "f").write_text("keep me")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        model.save_pretrained(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- interrupts
def _disk_full(message):
    return OSError(errno.ENOSPC, f"No space left on device ({message})")


class Faults:
    """Counts the calls a save makes to the functions that write, rename, sync or delete, and raises
    ``fault`` (KeyboardInterrupt by default) at call number ``at`` (never when ``at`` is None)."""

    NAMES = ("open", "close", "fsync", "replace", "chmod", "unlink")

    def __init__(self, monkeypatch, at=None, fault=KeyboardInterrupt):
        import safetensors.torch

        self.at, self.fault, self.calls = at, fault, []
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        monkeypatch.setattr(safetensors.torch, "save_file", self._wrap("save_file", safetensors.torch.save_file))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            if len(self.calls) - 1 == self.at:
                if name == "save_file":  # interrupted half-way through writing its file
                    Path(args[1]).write_bytes(b"partial")
                raise self.fault(f"fault at step {self.at} ({name})")
            return fn(*args, **kwargs)
        return wrapper


@pytest.fixture(scope="module")
def new_model(model, saved, tmp_path_factory):
    """A second model, different in config and tensors (other heads, another router), to save over the first."""
    gen = torch.Generator().manual_seed(8)
    heads = {t: torch.randn(2, 32, generator=gen) for t in model.tasks}
    return mass.MASSModel.from_pretrained(saved[2], base_model=build_model("hf"), heads=heads,
                                          router=mass.RouterConfig(layer=1, mode="top1"))


@pytest.mark.parametrize("old_format,fault", [(2, KeyboardInterrupt), (1, KeyboardInterrupt), (2, _disk_full)],
                         ids=["interrupt", "interrupt_over_format_1", "disk_full"])
def test_an_interrupt_at_any_step_of_a_save_leaves_the_old_or_the_new_model_whole(
        model, saved, new_model, tmp_path, monkeypatch, old_format, fault):
    config, tensors, saved_dir = saved

    def fresh(i):
        d = tmp_path / f"m{i}"
        if old_format == 2:
            shutil.copytree(saved_dir, d)
        else:
            forge_v1(d, config, tensors)
        return d

    target = fresh("count")
    with monkeypatch.context() as m:
        steps = Faults(m)
        new_model.save_pretrained(target)
    names = steps.calls
    assert "replace" in names and "save_file" in names
    commit = names.index("replace")
    for i in range(len(names)):
        d = fresh(i)
        before = {p.name: p.read_bytes() for p in d.iterdir()}
        with monkeypatch.context() as m:
            faults = Faults(m, at=i, fault=fault)
            with pytest.raises(KeyboardInterrupt if fault is KeyboardInterrupt else OSError, match=f"fault at step {i}"):
                new_model.save_pretrained(d)
        assert faults.calls[: i + 1] == names[: i + 1]  # the same sequence of steps each time
        listing = sorted(p.name for p in d.iterdir())
        assert not [n for n in listing if n.endswith(".tmp")], (i, names[i], listing)  # no stray temporary file
        if i <= commit:  # the rename did not happen: the old files are untouched
            assert {p.name: p.read_bytes() for p in d.iterdir()} == before, (i, names[i])
            expected = model
        else:
            assert MODEL_NAME in listing
            expected = new_model
        with warnings.catch_warnings():  # an untouched format-1 directory warns when loaded: not the point here
            warnings.simplefilter("ignore", UserWarning)
            config, dec, heads = read_saved(d, trust_task_order=True)
            assert router_config(config) == expected.router_config
            assert_same_artifact((dec, heads), expected)
            if i == commit:  # interrupted at the rename itself: the old model, also as a whole model
                assert_same_model(mass.MASSModel.from_pretrained(d, base_model=build_model("hf"),
                                                                 trust_task_order=True), expected)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def ckpts():
    pretrained, finetuned, _ = make_setup("hf")
    base = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    return base, finetuned


def _matrix_key(sd):
    return next(k for k, v in sd.items() if v.dim() == 2 and "layers.1." in k)


def _with(sd, key, value):
    return {**sd, key: value}


CHECKPOINT_CASES = [
    ("int_weights", lambda sd: _with(sd, _matrix_key(sd), sd[_matrix_key(sd)].round().long()),
     r"'bad': these weights are not floating point: \[.*layers\.1\..* \(int64\)"),
    ("bool_weights", lambda sd: _with(sd, _matrix_key(sd), sd[_matrix_key(sd)] > 0),
     r"not floating point: .*\(bool\)"),
    ("ema_copy", lambda sd: {**sd, **{"ema." + k: v for k, v in sd.items()}},
     r"'bad' holds the pretrained model's weights more than once \(key prefixes '' and 'ema\.'\)"),
    ("two_prefixed_copies", lambda sd: {**{"model." + k: v for k, v in sd.items()}, **{"ema." + k: v for k, v in sd.items()}},
     r"more than once \(key prefixes 'ema\.' and 'model\.'\)"),
    ("unexpected_key", lambda sd: {**sd, "extra.weight": torch.zeros(2)}, r"1 unexpected keys .*\['extra\.weight'\]"),
    ("unexpected_under_prefix", lambda sd: {**{"visual." + k: v for k, v in sd.items()}, "visual.extra": torch.zeros(1)},
     r"unexpected keys under the prefix 'visual\.' .*\['visual\.extra'\]"),
    ("missing_key", lambda sd: {k: v for k, v in list(sd.items())[1:]}, r"does not match the pretrained model: 1 missing"),
    ("nan", lambda sd: _with(sd, _matrix_key(sd), sd[_matrix_key(sd)] * float("nan")), r"layers\.1\..* contains NaN or Inf"),
    ("not_a_tensor", lambda sd: _with(sd, _matrix_key(sd), [1.0]), r"entries are not tensors"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoints_are_refused_naming_the_problem(ckpts, edit, message):
    base, finetuned = ckpts
    with pytest.raises(CheckpointError, match=message):
        float_keys, opened = open_finetuned(base, {"good": finetuned["task0"], "bad": edit(dict(finetuned["task1"]))})
        for _, src, key_map in opened:  # NaN is found when a tensor is read, as decompose reads them
            for k in float_keys:
                src.get(key_map[k])


def test_integer_weights_are_refused_by_merge_before_any_svd(ckpts):
    _, finetuned = ckpts
    sd = dict(finetuned["task1"])
    key = _matrix_key(sd)
    sd[key] = sd[key].round().to(torch.int32)
    with pytest.raises(CheckpointError, match=rf"'task1': these weights are not floating point: \['{key} \(int32\)'\]"):
        mass.decompose(build_model("hf"), {**finetuned, "task1": sd}, progress=False)


@pytest.mark.parametrize("case", ["prefix_only_copy", "parent_with_text_tower", "old_position_ids", "child_module"])
def test_checkpoints_that_are_fine_are_read_exactly(ckpts, case):
    base, finetuned = ckpts
    sd = finetuned["task1"]
    if case == "prefix_only_copy":
        ckpt = {"ema." + k: v for k, v in sd.items()}
    elif case == "parent_with_text_tower":
        ckpt = {**{"vision." + k: v for k, v in sd.items()}, "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(3)}
    elif case == "old_position_ids":
        ckpt = {**sd, "vision_model.embeddings.position_ids": torch.arange(17)[None]}
    else:
        base = {"vision." + k: v for k, v in base.items()}
        ckpt = sd
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        float_keys, opened = open_finetuned(base, {"t": ckpt})
    skipped = [str(w.message) for w in caught if "text tower" in str(w.message)]
    # the text tower of a full CLIP model (the allow-list) is skipped with one warning naming it, nothing else is
    assert skipped == (["checkpoint 't': skipped 1 keys of a full CLIP model's text tower (only the vision tower is "
                        "merged): ['text_model.encoder.layers.0.mlp.fc1.weight']"]
                       if case == "parent_with_text_tower" else []), skipped
    (_, src, key_map), = opened
    ref = {"vision." + k: v for k, v in sd.items()} if case == "child_module" else sd
    assert len(key_map) == len(base)
    assert all(torch.equal(src.get(key_map[k]), ref[k]) for k in float_keys)


def test_the_same_checkpoint_under_two_names_is_refused(ckpts, tmp_path):
    base, finetuned = ckpts
    with pytest.raises(CheckpointError, match=r"checkpoints 'a' and 'c' are the same weights"):
        open_finetuned(base, {"a": finetuned["task0"], "b": finetuned["task1"],
                              "c": {k: v.clone() for k, v in finetuned["task0"].items()}})
    path = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in finetuned["task2"].items()}, str(path))
    with pytest.raises(CheckpointError, match=r"checkpoints 'x' and 'y' are the same weights"):
        open_finetuned(base, {"x": path, "y": str(path)})


def test_checkpoints_sharing_the_probed_tensors_but_not_all_are_distinct(ckpts):
    """The fingerprint only probes three tensors; equal probes must not be taken for equal checkpoints."""
    base, finetuned = ckpts
    float_keys = [k for k, v in base.items() if v.is_floating_point()]
    probes = {float_keys[0], float_keys[len(float_keys) // 2], float_keys[-1]}
    other = next(k for k in float_keys if k not in probes)
    twin = dict(finetuned["task0"])
    twin[other] = twin[other] + 1.0
    _, opened = open_finetuned(base, {"a": finetuned["task0"], "b": twin})
    assert [name for name, _, _ in opened] == ["a", "b"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("where", ["file", "in_hf_dir", "pt"])
def test_a_fifo_checkpoint_is_refused_without_hanging(ckpts, tmp_path, where):
    base, finetuned = ckpts
    if where == "in_hf_dir":
        path = fifo = tmp_path / "hf"
        path.mkdir()
        fifo = path / "model.safetensors"
    else:
        path = fifo = tmp_path / ("ft.safetensors" if where == "file" else "ft.pt")
    os.mkfifo(fifo)
    with released_if_stuck([fifo]) as in_time:
        with pytest.raises(CheckpointError, match=r"'fifo'.* is not a regular file"):
            open_finetuned(base, {"a": finetuned["task0"], "fifo": path})
    assert in_time(), "opening a FIFO checkpoint blocked"


def test_a_legacy_torch_save_state_dict_loads_weights_only(ckpts, tmp_path):
    base, finetuned = ckpts
    torch.save(finetuned["task1"], tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(finetuned["task2"], tmp_path / "zip.pt")
    assert (tmp_path / "legacy.pt").read_bytes()[:2] != b"PK"  # really the legacy (non-zip) format
    float_keys, opened = open_finetuned(base, {"a": finetuned["task0"], "legacy": tmp_path / "legacy.pt",
                                               "zip": tmp_path / "zip.pt"})
    for (_, src, key_map), want in zip(opened[1:], (finetuned["task1"], finetuned["task2"])):
        assert all(torch.equal(src.get(key_map[k]), want[k]) for k in float_keys)


def test_an_openclip_state_dict_with_two_vision_towers_is_refused():
    from mass.method.synthetic import OpenCLIPStyleViT

    sd = OpenCLIPStyleViT(width=32, layers=1).state_dict()
    both = {**{"visual." + k: v for k, v in sd.items()}, **{"ema.visual." + k: v for k, v in sd.items()}}
    with pytest.raises(CheckpointError, match=r"holds 2 vision towers .*'ema\.visual\.', 'visual\.'"):
        openclip_to_hf(both, ["embeddings.class_embedding"])


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, model, saved):
    """A pretrained HF directory, fine-tuned checkpoints of it, and a saved MASS model."""
    root = tmp_path_factory.mktemp("cli")
    pretrained = build_model("hf")
    pretrained.save_pretrained(root / "pretrained")
    finetuned = make_setup("hf")[1]
    for i in range(2):
        save_file({k: v.contiguous() for k, v in finetuned[f"task{i}"].items()}, str(root / f"t{i}.safetensors"))
    sd = {k: v.contiguous() for k, v in finetuned["task1"].items()}
    key = _matrix_key(sd)
    save_file({**sd, key: sd[key].round().long()}, str(root / "int.safetensors"))
    save_file({**sd, **{"ema." + k: v.clone() for k, v in sd.items()}}, str(root / "ema.safetensors"))
    (root / "file").write_text("x")
    return root


def _prepare(root: Path, tmp: Path, case: str) -> None:
    """Build what one CLI case needs under ``tmp`` (placeholders in argv: ROOT, TMP)."""
    if case == "corrupt_config":
        shutil.copytree(root / "pretrained", tmp / "pre")
        (tmp / "pre" / "config.json").write_text("{oops")
    elif case == "no_weights":
        (tmp / "pre").mkdir()
        shutil.copy(root / "pretrained" / "config.json", tmp / "pre")
    elif case == "corrupt_weights":
        shutil.copytree(root / "pretrained", tmp / "pre")
        (tmp / "pre" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    elif case == "fifo_config":
        (tmp / "pre").mkdir()
        shutil.copy(root / "pretrained" / "model.safetensors", tmp / "pre")
        os.mkfifo(tmp / "pre" / "config.json")
    elif case == "fifo_finetuned":
        os.mkfifo(tmp / "ft.safetensors")
    elif case == "inspect_v1_missing_field":
        shutil.copytree(root / "v1", tmp / "v1")
        cfg = json.loads((tmp / "v1" / LEGACY_CONFIG_NAME).read_text())
        del cfg["router"]
        (tmp / "v1" / LEGACY_CONFIG_NAME).write_text(json.dumps(cfg))
    elif case == "inspect_truncated":
        shutil.copytree(root / "saved", tmp / "s")
        data = (tmp / "s" / MODEL_NAME).read_bytes()
        (tmp / "s" / MODEL_NAME).write_bytes(data[:-100])


MERGE = ["merge", "--pretrained", "ROOT/pretrained", "--quiet", "--finetuned", "a=ROOT/t0.safetensors"]
CLI_CASES = [
    ("out_is_file", MERGE + ["b=ROOT/t1.safetensors", "--out", "ROOT/file"], "--out ROOT/file exists and is not a directory"),
    ("out_under_file", MERGE + ["b=ROOT/t1.safetensors", "--out", "ROOT/file/sub"], "ROOT/file is not a directory"),
    ("pretrained_missing", ["merge", "--pretrained", "TMP/none", "--finetuned", "a=ROOT/t0.safetensors", "--out", "TMP/o"],
     "--pretrained must be a HF model directory"),
    ("no_weights", ["merge", "--pretrained", "TMP/pre", "--finetuned", "a=ROOT/t0.safetensors", "--out", "TMP/o"],
     "has no weights"),
    ("corrupt_config", ["merge", "--pretrained", "TMP/pre", "--finetuned", "a=ROOT/t0.safetensors", "--out", "TMP/o"],
     "cannot load the model"),
    ("corrupt_weights", ["merge", "--pretrained", "TMP/pre", "--finetuned", "a=ROOT/t0.safetensors", "--out", "TMP/o"],
     "cannot load the model"),
    ("fifo_config", ["merge", "--pretrained", "TMP/pre", "--finetuned", "a=ROOT/t0.safetensors", "--out", "TMP/o"],
     "config.json is not a regular file"),
    ("fifo_finetuned", MERGE + ["f=TMP/ft.safetensors", "--out", "TMP/o"], "'f': TMP/ft.safetensors is not a regular file"),
    ("int_weights", MERGE + ["i=ROOT/int.safetensors", "--out", "TMP/o"], "these weights are not floating point"),
    ("ema_copy", MERGE + ["e=ROOT/ema.safetensors", "--out", "TMP/o"], "more than once"),
    ("missing_finetuned", MERGE + ["m=ROOT/none.safetensors", "--out", "TMP/o"], "'m': no such file"),
    ("bad_rank", MERGE + ["b=ROOT/t1.safetensors", "--rank", "lots", "--out", "TMP/o"], "--rank must be"),
    ("missing_out", MERGE, "the following arguments are required: --out"),
    ("bad_mode", MERGE + ["--mode", "best", "--out", "TMP/o"], "argument --mode: invalid choice"),
    ("no_command", [], "the following arguments are required: command"),
    ("inspect_not_dir", ["inspect", "ROOT/file"], "not a directory"),
    ("inspect_empty", ["inspect", "TMP"], "is not a saved MASS model"),
    ("inspect_v1_missing_field", ["inspect", "TMP/v1"], "missing field(s) 'router'"),
    ("inspect_truncated", ["inspect", "TMP/s"], "truncated or corrupted"),
]


@pytest.fixture(scope="module")
def cli_root(cli_files, saved):
    config, tensors, saved_dir = saved
    shutil.copytree(saved_dir, cli_files / "saved", dirs_exist_ok=True)
    forge_v1(cli_files / "v1", config, tensors)
    return cli_files


@pytest.mark.parametrize("argv,message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_mistakes_end_with_one_error_line_and_exit_code_2(cli_root, tmp_path, capsys, argv, message):
    case = next(c[0] for c in CLI_CASES if c[1] is argv)
    _prepare(cli_root, tmp_path, case)
    sub = lambda s: s.replace("ROOT", str(cli_root)).replace("TMP", str(tmp_path))  # noqa: E731
    with released_if_stuck([p for p in tmp_path.rglob("*") if p.is_fifo()]) as in_time:
        rc = main([sub(a) for a in argv])
    assert in_time()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert [l for l in lines if l.startswith("mass: error:")] == [lines[-1]], err  # exactly one, and last
    assert "Traceback" not in err and sub(message) in lines[-1], err
    assert not (tmp_path / "o").exists()  # nothing was written


def test_cli_oserror_while_saving_is_one_line(cli_root, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[1]))

    monkeypatch.setattr(os, "replace", refuse)
    rc = main(["merge", "--pretrained", str(cli_root / "pretrained"), "--quiet", "--finetuned",
               f"a={cli_root / 't0.safetensors'}", f"b={cli_root / 't1.safetensors'}", "--layer", "2",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("mass: error:") == 1 and "Permission denied" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == []  # the temporary file was removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_cli_out_not_writable(cli_root, tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    rc = main(MERGE[:3] + ["--finetuned", f"a={cli_root / 't0.safetensors'}", "--out", str(tmp_path / "ro" / "o")])
    assert rc == 2 and "is not writable" in capsys.readouterr().err


def test_cli_inspect_format_1_warns_on_one_line(cli_root, capsys):
    assert main(["inspect", str(cli_root / "v1")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mass: warning:") and "format-1" in err[0]


def test_cli_mass_debug_keeps_the_traceback(cli_root, monkeypatch):
    monkeypatch.setenv("MASS_DEBUG", "1")
    with pytest.raises(SavedModelError, match="not a saved MASS model"):
        main(["inspect", str(cli_root)])


@pytest.mark.parametrize("argv,message", [
    (["inspect", "DIR"], "is not a saved MASS model"),
    (["merge", "--pretrained", "DIR"], "the following arguments are required"),
])
def test_cli_as_a_process_prints_one_error_line(tmp_path, argv, message):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASS_DEBUG": ""}
    env.pop("MASS_DEBUG")
    proc = subprocess.run([sys.executable, "-m", "mass.tools.cli.main", *[a.replace("DIR", str(tmp_path)) for a in argv]],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("mass: error:") and message in lines[-1], proc.stderr
    assert sum(l.startswith("mass: error:") for l in lines) == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- issue 24
# Checkpoint structure, checked both ways: every key maps to a parameter of the model, or is refused, named.
STRUCTURE_CASES = [
    ("one_more_block", lambda sd: make_setup_deeper(), r"'bad' has 16 unexpected keys that the pretrained model "
                                                       r"lacks: \['encoder\.layers\.4\.layer_norm1\.bias'"),
    ("projection_the_tower_lacks", lambda sd: {**sd, "visual_projection.weight": torch.zeros(16, 32)},
     r"'bad' has 1 unexpected keys that the pretrained model lacks: \['visual_projection\.weight'\]"),
    ("unknown_key_beside_a_text_tower", lambda sd: {**sd, "text_model.x.weight": torch.zeros(2), "head.weight": torch.zeros(2)},
     r"'bad' has 1 unexpected keys that the pretrained model lacks: \['head\.weight'\]"),
]


def make_setup_deeper():
    """A fine-tuned state dict of the test encoder with one more block (5 instead of 4)."""
    from mass.method.synthetic import finetuned_like

    return finetuned_like(build_model("hf", layers=5), 1, scale=0.1, seed=3)["task0"]


@pytest.mark.parametrize("edit,message", [c[1:] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES])
@pytest.mark.parametrize("entry", ["merge", "open_finetuned"])
def test_checkpoint_structure_is_checked_both_ways(ckpts, entry, edit, message, monkeypatch):
    """An extra block of a deeper encoder, or a key the model lacks, used to be dropped without a word."""
    base, finetuned = ckpts
    bad = edit(dict(finetuned["task1"]))
    if entry == "open_finetuned":
        with pytest.raises(CheckpointError, match=message):
            open_finetuned(base, {"good": finetuned["task0"], "bad": bad})
        return
    monkeypatch.setattr("mass.nn.merge.decompose", lambda *a, **k: pytest.fail("decompose ran"))
    with pytest.raises(CheckpointError, match=message):
        mass.merge(build_model("hf"), {"good": finetuned["task0"], "bad": bad}, progress=False)


def test_open_clip_keys_are_checked_both_ways_through_the_conversion():
    from mass.method.synthetic import OpenCLIPStyleViT

    two = {"visual." + k: v for k, v in OpenCLIPStyleViT(width=32, layers=2).state_dict().items()}
    one = OpenCLIPStyleViT(width=32, layers=1)
    target = list(openclip_to_hf({"visual." + k: v for k, v in one.state_dict().items()},
                                 _hf_keys_of(one)).keys())
    with pytest.raises(CheckpointError, match=r"'deep' has \d+ unexpected keys under the prefix 'visual\.' that the "
                                              r"pretrained model lacks \(open_clip names\): \['visual\.transformer\.resblocks\.1\."):
        openclip_to_hf(two, target, "deep")
    no_proj = [k for k in target if not k.startswith("visual_projection")]
    one_sd = {"visual." + k: v for k, v in one.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"unexpected keys .*\['visual\.proj'\]"):
        openclip_to_hf(one_sd, no_proj, "proj")
    text = {**one_sd, "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3), "token_embedding.weight": torch.zeros(2),
            "logit_scale": torch.zeros(())}
    with pytest.warns(UserWarning, match=r"checkpoint 'full': skipped 3 keys of a full CLIP model's text tower .*"
                                         r"\['logit_scale', 'token_embedding\.weight', 'transformer\.resblocks\.0"):
        got = openclip_to_hf(text, target, "full")
    want = openclip_to_hf(one_sd, target, "full")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _hf_keys_of(oc):
    """The HF key names of an open_clip tower's twin (as tests/test_cli_and_convert.py builds it)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    width = oc.conv1.out_channels
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=len(oc.transformer.resblocks),
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=oc.proj.shape[1])
    return list(CLIPVisionModelWithProjection(cfg).state_dict().keys())


def test_a_full_clip_checkpoints_text_tower_is_skipped_with_a_warning_naming_it(ckpts):
    """The documented allow-list: the merge equals the merge of the vision keys alone, and one warning per
    checkpoint names the keys skipped."""
    _, finetuned = ckpts
    text = {"text_model.encoder.layers.0.mlp.fc1.weight": torch.ones(4, 4), "text_projection.weight": torch.ones(2, 4),
            "logit_scale": torch.tensor(2.0)}
    full = {**finetuned, "task1": {**finetuned["task1"], **text}}
    heads = {t: torch.ones(2, 32) for t in finetuned}
    with pytest.warns(UserWarning, match=r"checkpoint 'task1': skipped 3 keys of a full CLIP model's text tower "
                                         r"\(only the vision tower is merged\): \['logit_scale', 'text_model\.encoder"):
        got = mass.merge(build_model("hf"), full, progress=False, router=mass.RouterConfig(layer=2), heads=heads)
    want = mass.merge(build_model("hf"), finetuned, progress=False, router=mass.RouterConfig(layer=2), heads=heads)
    assert_same_artifact((got.decomposition(), heads), want)


# Saved task order, bound to the tensors.
def _swap(config, tensors, order=(1, 0, 2)):
    """The stacked tensors' task entries permuted by ``order`` (config unchanged)."""
    out = dict(tensors)
    for name, value in tensors.items():
        if name.startswith(("lowrank/", "dense/")):
            out[name] = value[list(order)].contiguous()
    return out


def test_a_reordered_task_list_fails_to_load_in_both_formats(saved, tmp_path):
    config, tensors, _ = saved
    reordered = {**config, "tasks": ["task1", "task0", "task2"]}
    forge(tmp_path / "v2", reordered, tensors)  # checksum recomputed: the file is intact, its meaning is not
    with pytest.raises(SavedModelError, match=r"'tasks' is not in the order the tensors were saved in: the entries "
                                              r"listed as \['task1', 'task0'\] hold the tensors of \['task0', 'task1'\]"
                                              r" \(per-task digests\); the task list .* was reordered"):
        read_saved(tmp_path / "v2")
    forge(tmp_path / "tensors", config, _swap(config, tensors))  # the same, done on the tensors' side
    with pytest.raises(SavedModelError, match=r"was reordered \(the tensors' order is \['task1', 'task0', 'task2'\]\)"):
        read_saved(tmp_path / "tensors")
    edited = dict(tensors)
    key = next(k for k in tensors if k.startswith("lowrank/") and k.endswith("/U"))
    edited[key] = tensors[key].clone()
    edited[key][2, 0, 0] += 1.0
    forge(tmp_path / "edited", config, edited)
    with pytest.raises(SavedModelError, match=r"the entries of task\(s\) \['task2'\] differ from the tensors they were "
                                              r"saved with \(per-task digests\)"):
        read_saved(tmp_path / "edited")
    # format 1 holds nothing that binds the order (no per-task digest, no task name on a stacked tensor, the
    # config outside any checksum): a format-1 directory is refused unless trusted, the edit included
    forge_v1(tmp_path / "v1", reordered, tensors)
    with pytest.raises(SavedModelError, match=r"is a format-1 MASS model: .*task order is not bound to its tensors"):
        read_saved(tmp_path / "v1")
    # so is a format-2 file written before the binding existed (no task_digests), reordered or not
    old = {k: v for k, v in reordered.items() if k != "task_digests"}
    forge(tmp_path / "old", old, tensors)
    with pytest.raises(SavedModelError, match=r"saved before each task's name was bound to its tensors \(its config "
                                              r"has no task_digests\).*trust_task_order=True"):
        mass.MASSModel.from_pretrained(tmp_path / "old", base_model=build_model("hf"))
    with pytest.warns(UserWarning, match=r"no task_digests.*loaded as trusted"):
        assert read_saved(tmp_path / "old", trust_task_order=True)[0]["tasks"] == ["task1", "task0", "task2"]


def _no_heads(config, tensors):
    return {**config, "has_heads": False}, {k: v for k, v in tensors.items() if not k.startswith("heads/")}


def _extra_task(config, tensors, heads=True):
    config = {**config, "tasks": config["tasks"] + ["task3"], "task_digests": {**config["task_digests"], "task3": "0" * 64}}
    return (config, tensors) if heads else _no_heads(config, tensors)


def _drop_dense_bias(config, tensors):
    key = next(k for k in tensors if k.startswith("dense/") and k.endswith(".bias"))
    return config, {k: v for k, v in tensors.items() if k != key}


@pytest.mark.parametrize("edit,message", [
    (lambda c, t: _extra_task(c, t), r"'tasks' does not match the saved heads .*tasks without a head \['task3'\]"),
    (lambda c, t: _extra_task(c, t, heads=False),
     r"'tasks' lists 4 tasks \['task0', 'task1', 'task2', 'task3'\] but the saved tensors hold 3 .*names tasks that "
     r"were not saved"),
    (_drop_dense_bias, r"saved tensors: missing \['dense/.*\.bias'\]: every floating pretrained weight needs"),
], ids=["extra_task_with_heads", "extra_task_without_heads", "dense_missing_bias"])
def test_task_lists_and_tensor_sets_are_checked_first_naming_what_is_missing_or_extra(saved, tmp_path, edit, message):
    """An extra task used to be blamed on some tensor's shape, a missing dense bias on the storage factor."""
    config, tensors, _ = saved
    config, tensors = edit(copy.deepcopy(config), dict(tensors))
    forge(tmp_path / "m", config, tensors)
    with pytest.raises(SavedModelError, match=message):
        read_saved(tmp_path / "m")


def test_inspect_of_an_unbound_directory_warns_on_one_line(saved, tmp_path, capsys):
    config, tensors, _ = saved
    forge(tmp_path / "old", {k: v for k, v in config.items() if k != "task_digests"}, tensors)
    assert main(["inspect", str(tmp_path / "old")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mass: warning:") and "no task_digests" in err[0], err


# A refused merge leaves the model already in --out loadable bit for bit.
@pytest.fixture(scope="module")
def refusal_files(cli_root):
    from mass.method.synthetic import finetuned_like

    sd = {k: v.contiguous() for k, v in make_setup("hf")[1]["task1"].items()}
    save_file({k: v.contiguous() for k, v in finetuned_like(build_model("hf", layers=5), 1, seed=4)["task0"].items()},
              str(cli_root / "deeper.safetensors"))
    save_file({**sd, "visual_projection.weight": torch.zeros(16, 32)}, str(cli_root / "proj.safetensors"))
    key = _matrix_key(sd)
    save_file({**sd, key: sd[key] * float("nan")}, str(cli_root / "nan.safetensors"))
    return cli_root


REFUSED_MERGES = [
    ("one_more_block", ["b=ROOT/deeper.safetensors"], "'b' has 16 unexpected keys that the pretrained model lacks"),
    ("projection_the_tower_lacks", ["b=ROOT/proj.safetensors"], "unexpected keys that the pretrained model lacks: "
                                                                "['visual_projection.weight']"),
    ("int_weights", ["i=ROOT/int.safetensors"], "these weights are not floating point"),
    ("ema_copy", ["e=ROOT/ema.safetensors"], "more than once"),
    ("nan", ["n=ROOT/nan.safetensors"], "contains NaN or Inf"),
    ("same_twice", ["b=ROOT/t0.safetensors"], "checkpoints 'a' and 'b' are the same weights"),
    ("missing", ["m=ROOT/none.safetensors"], "'m': no such file"),
]


@pytest.mark.parametrize("extra,message", [c[1:] for c in REFUSED_MERGES], ids=[c[0] for c in REFUSED_MERGES])
def test_a_refused_merge_leaves_the_model_in_out_loadable_bit_for_bit(refusal_files, model, tmp_path, capsys,
                                                                      extra, message):
    root = refusal_files
    out = tmp_path / "good"
    shutil.copytree(root / "saved", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = MERGE + extra + ["--layer", "2", "--out", str(out)]
    rc = main([a.replace("ROOT", str(root)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("mass: error:") == 1 and message in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert_same_model(mass.MASSModel.from_pretrained(out, base_model=build_model("hf")), model)


# mass eval's inputs.
@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    """A full tiny CLIP directory, two fine-tuned towers of it and image folders root/data/<task>/<class>/*."""
    from _clip_fixtures import finetuned_towers, save_clip, task_images, tiny_clip, write_image_folders, write_tokenizer
    from mass.nn.clip import vision_encoder

    root = tmp_path_factory.mktemp("eval24")
    tok = write_tokenizer(root / "tok")
    clip = tiny_clip(tok, layers=2)
    save_clip(root / "clip", clip, tok)
    for name, sd in finetuned_towers(vision_encoder(clip), 2).items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / f"{name}.safetensors"))
    write_image_folders(root / "data", task_images({"task0": ["a", "b"], "task1": ["c", "d", "e"]}, per_class=2))
    return root


EVAL = ["eval", "--pretrained", "ROOT/clip", "--finetuned", "task0=ROOT/task0.safetensors",
        "task1=ROOT/task1.safetensors", "--methods", "individual,mass", "--no-latency", "--quiet", "--out", "TMP/out"]
EVAL_CASES = [
    ("routers_empty", ["--data-root", "ROOT/data", "--routers", ""], "--routers names no router (got '')"),
    ("routers_blank_list", ["--data-root", "ROOT/data", "--routers", " , "], "--routers names no router"),
    ("routers_unknown", ["--data-root", "ROOT/data", "--routers", "paper,bogus"],
     "--routers: unknown router(s) ['bogus']"),
    ("templates_not_json", ["--data-root", "ROOT/data", "--templates", "TMP/t.json"],
     "--templates TMP/t.json: not valid JSON"),
    ("templates_missing", ["--data-root", "ROOT/data", "--templates", "TMP/none.json"],
     "--templates TMP/none.json: cannot read the file"),
    ("classes_not_json", ["--data-root", "ROOT/data", "--classes", "TMP/t.json"], "--classes TMP/t.json: not valid JSON"),
    ("data_missing_absolute", ["--data", "task0=ROOT/data/tsk0", "task1=ROOT/data/task1"],
     "data for task 'task0': the local path ROOT/data/tsk0 does not exist"),
    ("data_missing_relative", ["--data", "task0=data/tsk0", "task1=data/task1"],
     "data for task 'task0': the local path data/tsk0 does not exist (resolved to ROOT/data/tsk0; data does exist)"),
    ("data_missing_hub_shaped", ["--data", "task0=dta/task0", "task1=data/task1"],
     "data for task 'task0': no local directory dta/task0 (resolved to ROOT/dta/task0); as a hub dataset id:"),
    ("empty_class_folder", ["--data", "task0=TMP/task0", "task1=ROOT/data/task1"],
     "image folder TMP/task0: class folder(s) ['zz_empty'] hold no images"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_mass_eval_input_mistakes_are_usage_errors(eval_root, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(eval_root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "t.json").write_text("{not json")
    shutil.copytree(eval_root / "data" / "task0", tmp_path / "task0")
    (tmp_path / "task0" / "zz_empty").mkdir()
    sub = lambda s: s.replace("ROOT", str(eval_root)).replace("TMP", str(tmp_path))  # noqa: E731
    rc = main([sub(a) for a in EVAL + argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and [l for l in lines if l.startswith("mass: error:")] == [lines[-1]], err
    assert sub(message) in lines[-1] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_mass_eval_skips_hidden_folders_and_records_classes_and_templates(eval_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(eval_root / "data", data)
    for hidden in (data / ".ipynb_checkpoints", data / "task0" / ".ipynb_checkpoints"):
        hidden.mkdir()
        shutil.copy(next((data / "task0" / "class_0").iterdir()), hidden / "000.png")
    shutil.copy(next((data / "task0" / "class_0").iterdir()), data / "task0" / "class_0" / "._000.png")
    templates = {"task0": ["a photo of {}."], "task1": ["a {} texture.", "art of {}."]}
    (tmp_path / "templates.json").write_text(json.dumps(templates))
    argv = [a.replace("ROOT", str(eval_root)).replace("TMP", str(tmp_path)) for a in EVAL]
    argv[argv.index("individual,mass")] = "individual"
    assert main(argv + ["--data-root", str(data), "--templates", str(tmp_path / "templates.json")]) == 0, \
        capsys.readouterr().err
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    assert got["config"]["classes"] == {"task0": ["class 0", "class 1"], "task1": ["class 0", "class 1", "class 2"]}
    assert got["config"]["templates"] == templates
    from mass.evaluation.data import ClipPreprocess, ImageFolderData

    assert len(ImageFolderData(data / "task0", ClipPreprocess())) == 4  # the hidden ._000.png is not an image
