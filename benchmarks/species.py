"""The science loop as one command: does self-supervision find species?

Pretrains each method for a fixed budget on the real, unlabelled pool beside the project, then
scores every labelled set under `<data>/labelled/` in every output space, against log-mel
statistics, against an untrained copy of each backbone, and beside BirdNET:

1. The pool: every recording under `<data>` (soundscapes/, unlabelled/ and labelled/), inventoried
   and tiled by the project's own stages into `<out>/pool/`. Labels never reach training: the
   tiler reads audio files, not labels tables (labelled recordings join as unlabelled audio).
   Pretraining has still *heard* the recordings it is scored on. `--hold-out SET` keeps a labelled
   set's recordings out of the pool, so that set is scored on audio pretraining never met, as
   recordings outside `<data>` would be.
2. The recipe: notebook 03's parameters as a profile sets them (`--profile`, default real_pool),
   built into each method's TrainConfig by the function notebook 03 calls, then `--set` overrides
   (e.g. `--set vicreg.augment.gain_db=3`). So a recipe measured here is the one a profile runs.
3. The budget: `--budget-min` minutes of training steps per method (setup excluded). A short
   calibration run measures this machine's steps per second for the recipe, and the schedules
   (learning rate, weight decay, DINO's teacher momentum) then span exactly the steps that fit,
   so every run ends annealed. `--steps` fixes the steps instead (what the JSON reports, so a
   result can be rerun exactly on another machine).
4. The scores: `analysis.validate` on each labelled set (the 10 loudest 3 s windows of each
   recording, kNN with folds grouped by recordist where the set names one, KMeans NMI / ARI),
   and paired bootstrap differences over those groups against log-mel statistics and against
   the method's untrained copy. Each method is reported in the pooling it trained
   (`checkpoint.embedding_pooling`), declared before scoring; the other poolings are listed too.

`--compare RUN REFERENCE_RUN` trains and scores nothing: it pairs two finished runs (e.g. one recipe
trained with two seeds, or two recipes) on the windows both scored, over the same groups, from the
predictions each wrote. The intervals above cover the sample of recordists, not training noise;
two seeds of one recipe measure that. Each run's space is the pooling it trained; `--pooling P`
pairs pooling P of both (two recipes read the same way, e.g. one trained on `band` and one on
`band_active`, both read with `band_active`).

`--rescore RUN` trains nothing: it scores a finished run's checkpoints again with the scorer of
this checkout (a pooling or a labelled set added since) with the windows and bootstrap of RUN's
own command, replacing the sets in RUN's species.json and keeping its training record;
`rescored` says which command and commit scored them. The same windows and folds give the same
predictions for a space that was scored before, so `--compare` against older runs stays paired.

`--table RUN [RUN ...]` trains and scores nothing either: it prints the finished runs as one
Markdown table (a row per run and method; per labelled set the kNN accuracy, its paired difference
against log-mel with the interval, the NMI and the untrained copy's kNN), the rows notebook 07's
ablation is made of, then the same rows as the JSON line.

Checkpoints stay at `<out>/<tag>/<method>/checkpoint.pth` so a result can be checked on other
labelled data (`soundscape-ssl embed` / `validate`). A rerun with the same arguments resumes:
tiling, training and embeddings are resumable stages.

    python benchmarks/species.py                                          # 20 min per method, 2 CPU cores
    python benchmarks/species.py --methods vicreg --budget-min 6 --tag quick
    python benchmarks/species.py --device cuda --budget-min 8             # a GPU node
    python benchmarks/species.py --compare runs/species/seed1 runs/species/seed0  # two runs, paired
    python benchmarks/species.py --rescore runs/species/r32_pcen_12000steps_bf16 --threads 1
    python benchmarks/species.py --table runs/species/r*/ --sets xeno-canto-phoebe-10sp,xeno-canto-acrocephalus

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder with soundscapes/, unlabelled/ and labelled/ (default ../shared/data)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "species")
    parser.add_argument("--tag", default="",
                        help="subfolder of --out for this recipe's checkpoints and scores (default: none)")
    parser.add_argument("--profile", default="real_pool", help="profile whose notebook-03 recipe is trained")
    parser.add_argument("--methods", default=None, help="comma list (default: the profile's methods)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                        help="override a method's TrainConfig field (YAML value), e.g. dino.dino.pooling=band; "
                             "'all.FIELD=VALUE' sets it for every method")
    parser.add_argument("--budget-min", type=float, default=20.0, help="training minutes per method")
    parser.add_argument("--steps", default=None,
                        help="training steps per method instead of a budget: N for every method, or "
                             "METHOD=N,... (methods not named use the budget)")
    parser.add_argument("--calibration-steps", type=int, default=6)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch, OpenMP, MKL)")
    parser.add_argument("--sets", default=None, help="comma list of labelled sets (default: every one)")
    parser.add_argument("--top-k", type=int, default=10, help="loudest windows per labelled recording")
    parser.add_argument("--n-bootstrap", type=int, default=2000)
    parser.add_argument("--no-birdnet", action="store_true", help="skip the BirdNET reference")
    parser.add_argument("--hold-out", default="", metavar="SET[,SET]",
                        help="labelled sets whose recordings stay out of the pretraining pool (scored on "
                             "recordings pretraining never heard)")
    parser.add_argument("--pool-max-files", type=int, default=None,
                        help="tile only the first N recordings of the pool (smoke tests)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUN", "REFERENCE_RUN"), default=None,
                        help="train and score nothing: pair each method's space in RUN against the same "
                             "method's in REFERENCE_RUN (two folders this script wrote, e.g. one recipe "
                             "with two seeds) on every labelled set both scored")
    parser.add_argument("--pooling", default=None, metavar="POOLING",
                        help="with --compare: pair this pooling of both runs' checkpoints (one each run "
                             "scored, trained or not) instead of the pooling each run trained")
    parser.add_argument("--table", nargs="+", type=Path, metavar="RUN", default=None,
                        help="train and score nothing: the finished runs as one Markdown table, "
                             "labelled sets in --sets order (default: every set the runs scored)")
    parser.add_argument("--rescore", type=Path, metavar="RUN", default=None,
                        help="train nothing: score a finished run's checkpoints again with this checkout's "
                             "scorer (every pooling, every labelled set), keeping its training record")
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.compare, args.table, args.rescore)) > 1:
        parser.error("--compare, --table and --rescore are different jobs: give one")
    if args.pooling is not None and not args.compare:
        parser.error("--pooling chooses the spaces --compare pairs: give it with --compare")
    return args


ARGS = parse_args()
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = str(ARGS.threads)   # before torch is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(REPO / "lib"))
from soundscape_ssl.analysis import validate  # noqa: E402
from soundscape_ssl.core.config import merge_mappings  # noqa: E402
from soundscape_ssl.core.provenance import git_state, package_versions  # noqa: E402
from soundscape_ssl.pipeline.runner import profile_parameters  # noqa: E402
from soundscape_ssl.pretrain import launch, train  # noqa: E402
from soundscape_ssl.pretrain.checkpoint import load_checkpoint, save_untrained_copy  # noqa: E402
from soundscape_ssl.pretrain.pooling import POOLINGS  # noqa: E402
from soundscape_ssl.recordings.archive import scan_archive  # noqa: E402
from soundscape_ssl.report.training_report import read_training_log  # noqa: E402
from soundscape_ssl.tiles.tiling import tile_archive  # noqa: E402

LOGMEL = validate.space_key(validate.LOGMEL_SPACE, validate.LOGMEL_POOLING)
BIRDNET = validate.space_key(validate.BIRDNET_SPACE, validate.BIRDNET_POOLING)
HEADLINE_METRICS = {"knn_accuracy": "knn", "kmeans_nmi": "nmi", "kmeans_ari": "ari"}
PAIRED_METRICS = {"knn_accuracy": "knn", "nmi": "nmi", "ari": "ari"}


def log(message: str) -> None:
    print(f"[species {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_overrides(tokens: list[str], methods: list[str]) -> dict[str, Any]:
    """["dino.dino.pooling=band", "all.epochs=3"] -> {"dino": {"dino": {"pooling": "band"}}, ...}."""
    overrides: dict[str, Any] = {}
    for token in tokens:
        key, sep, text = token.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"species.py: --set takes METHOD.FIELD=VALUE, got {token!r}")
        target, _, path = key.partition(".")
        value = yaml.safe_load(text)
        for method in (methods if target == "all" else [target]):
            node = overrides.setdefault(method, {})
            *parents, leaf = path.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    return overrides


# ----------------------------------------------------------------------------------------------
# The pool


def tile_pool(data: Path, out: Path, max_files: int | None, held_out: list[str]) -> tuple[Path, dict[str, Any]]:
    """Inventory every recording under `data` but the labelled sets `held_out` and tile it
    (resumable); (store, description). Each pool has its own store, named by what it leaves out."""
    inventory = scan_archive(data, show_progress=True, num_threads=ARGS.threads)
    files = inventory.files.sort_values("relpath").reset_index(drop=True)
    n_held_out = 0
    if held_out:
        keep = ~files["relpath"].str.startswith(tuple(f"labelled/{name}/" for name in held_out))
        n_held_out = int((~keep).sum())
        files = files[keep].reset_index(drop=True)
    if max_files is not None:
        files = files.head(max_files)
    name = "tiles" if max_files is None else f"tiles_first{max_files}"
    store = out / "pool" / (name + "".join(f"_without_{set_name}" for set_name in sorted(held_out)))
    summary = tile_archive(files, store, rank=0, world_size=1, show_progress=True, threads=ARGS.threads)
    top = files["relpath"].str.split("/").str[0].value_counts().to_dict()
    return store, {"n_files": len(files), "held_out_sets": sorted(held_out), "n_files_held_out": n_held_out,
                   "quarantined": len(inventory.quarantine),
                   "audio_h": float(files["duration_s"].sum() / 3600.0), "files_by_folder": top,
                   "n_tiles": summary.n_tiles_total}


# ----------------------------------------------------------------------------------------------
# Training for a budget


def fixed_steps(text: str | None, method: str) -> int | None:
    """`--steps`: "N" for every method, or "dino=500,vicreg=1000"; None where the budget applies."""
    if not text:
        return None
    if "=" not in text:
        return int(text)
    named = dict(part.split("=", 1) for part in text.split(","))
    return int(named[method]) if method in named else None


def train_steps_per_s(method: str, settings: dict[str, Any], overrides: dict[str, Any], scratch: Path) -> float:
    """Median training steps per second of `method`'s recipe on this machine, from a short run
    (the first two steps, which include start-up, left out)."""
    shutil.rmtree(scratch, ignore_errors=True)
    steps = 2 + ARGS.calibration_steps
    config = launch.method_train_config(method, settings, overrides, scratch,
                                        extra={"max_steps": steps, "log_every": 1, "checkpoint_every_steps": 10**6})
    train.run(config)
    records, _ = read_training_log(scratch)
    rates = records[records["step"] > 2]["tiles_per_s"].to_numpy()
    shutil.rmtree(scratch, ignore_errors=True)
    return statistics.median(rates) / config.batch_size_per_gpu


def train_method(method: str, settings: dict[str, Any], overrides: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train (or resume) one method for the budget; what the JSON reports about it."""
    record: dict[str, Any] = {}
    existing = out_dir / "checkpoint.pth"
    fixed = fixed_steps(ARGS.steps, method)
    if fixed is not None:
        steps = fixed
    elif existing.is_file():   # a rerun resumes the budget it calibrated before
        steps = int(load_checkpoint(existing)["train_config"]["schedule_steps"])
        record["resumed_budget"] = True
    else:
        rate = train_steps_per_s(method, settings, overrides, out_dir.parent / f"_calibration_{method}")
        steps = max(1, int(ARGS.budget_min * 60.0 * rate))
        record["calibrated_steps_per_s"] = rate
    config = launch.method_train_config(method, settings, overrides, out_dir,
                                        extra={"max_steps": steps, "schedule_steps": steps})
    log(f"{method}: {steps} steps of {config.batch_size_per_gpu} tiles")
    started = time.perf_counter()
    try:
        summary = train.run(config)
        record["stopped"] = None
        record["final_loss"] = summary.last_loss
    except (train.CollapseDetectedError, train.NonFiniteLossError) as error:
        record["stopped"] = f"{type(error).__name__}: {error}"
        log(f"{method} stopped: {error}")
    record.update(steps=steps, train_wall_s=round(time.perf_counter() - started, 1),
                  batch_size=config.batch_size_per_gpu, config=str(out_dir / "config.json"))
    return record


# ----------------------------------------------------------------------------------------------
# Scores


def labelled_sets(data: Path, names: str | None) -> dict[str, Path]:
    folders = {p.parent.name: p.parent for p in sorted((data / "labelled").glob("*/labels.csv"))}
    if names:
        wanted = [name.strip() for name in names.split(",")]
        missing = [name for name in wanted if name not in folders]
        if missing:
            raise SystemExit(f"species.py: no labelled set {missing} in {data / 'labelled'}; have {sorted(folders)}")
        folders = {name: folders[name] for name in wanted}
    return folders


def validate_config(folder: Path) -> validate.ValidateConfig:
    """Windows and grouping for one labelled set: by recordist where its tables name one."""
    labels = pd.read_csv(folder / "labels.csv", nrows=1)
    metadata = folder / "metadata.csv"
    has_recordist = "recordist" in labels.columns or (
        metadata.is_file() and "recordist" in pd.read_csv(metadata, nrows=1).columns)
    return validate.ValidateConfig(
        window_selection="top_k_energy", top_k=ARGS.top_k, poolings=POOLINGS,
        group_by="recordist" if has_recordist else "recording",
        metadata_csv=str(metadata) if metadata.is_file() and "recordist" not in labels.columns else "",
        n_bootstrap=ARGS.n_bootstrap, include_birdnet=not ARGS.no_birdnet, device=ARGS.device)


def _values(result: validate.ValidationResult, key: str) -> dict[str, Any]:
    space, pooling = key.split("/")
    rows = result.scores[(result.scores["space"] == space) & (result.scores["pooling"] == pooling)]
    values: dict[str, Any] = {}
    for metric, short in HEADLINE_METRICS.items():
        row = rows[rows["metric"] == metric]
        if len(row):
            row = row.iloc[0]
            values[short] = round(float(row["value"]), 4)
            values[f"{short}_interval"] = [round(float(row["interval_low"]), 4), round(float(row["interval_high"]), 4)]
    return values


def _paired(table: pd.DataFrame, key: str) -> dict[str, Any]:
    space, pooling = key.split("/")
    return _differences(table[(table["space"] == space) & (table["pooling"] == pooling)])


def _differences(rows: pd.DataFrame) -> dict[str, Any]:
    """Paired rows (`core.stats.PAIRED_COLUMNS`) as the JSON reports them."""
    values: dict[str, Any] = {}
    for metric, short in PAIRED_METRICS.items():
        row = rows[rows["metric"] == metric]
        if len(row):
            row = row.iloc[0]
            values[short] = round(float(row["difference"]), 4)
            values[f"{short}_interval"] = [round(float(row["interval_low"]), 4), round(float(row["interval_high"]), 4)]
            values[f"{short}_share_not_better"] = round(float(row["share_not_better"]), 4)
    return values


def score_set(name: str, folder: Path, checkpoints: dict[str, Path], poolings: dict[str, str],
              out_dir: Path, in_pool: bool) -> dict[str, Any]:
    config = validate_config(folder)
    log(f"scoring {name} (grouped by {config.group_by})")
    result = validate.validate_labelled(folder / "labels.csv", folder, checkpoints, out_dir, config)
    selected = result.selected
    summary: dict[str, Any] = {
        "n_windows": len(selected), "n_recordings": int(selected["recording"].nunique()),
        "n_groups": int(selected["group"].nunique()), "grouping": config.group_by,
        "n_labels": int(selected["label"].nunique()), "in_pool": in_pool,
        "interval_method": str(result.scores["interval_method"].iloc[0]),
        "logmel": _values(result, LOGMEL), "skipped_spaces": result.skipped_spaces,
    }
    if BIRDNET in result.spaces:
        summary["birdnet"] = _values(result, BIRDNET)
    vs_logmel = validate.paired_against(result, LOGMEL, n_bootstrap=ARGS.n_bootstrap)
    methods = {}
    for method, pooling in poolings.items():
        key = validate.space_key(f"ssl_{method}", pooling)
        if key not in result.spaces:
            methods[method] = {"pooling": pooling, "missing": True}
            continue
        untrained = validate.space_key(f"ssl_untrained_{method}", pooling)
        vs_untrained = validate.paired_against(result, untrained, n_bootstrap=ARGS.n_bootstrap)
        # The other poolings of the same backbone, each paired against the trained one: whether
        # another way of reading the same tokens is better is a question of its own.
        vs_trained_pooling = validate.paired_against(result, key, n_bootstrap=ARGS.n_bootstrap)
        others = {p: validate.space_key(f"ssl_{method}", p) for p in POOLINGS if p != pooling}
        methods[method] = {
            "pooling": pooling, **_values(result, key), "untrained": _values(result, untrained),
            "vs_logmel": _paired(vs_logmel, key), "vs_untrained": _paired(vs_untrained, key),
            "other_poolings": {p: {**_values(result, other), "vs_logmel": _paired(vs_logmel, other),
                                   "vs_trained_pooling": _paired(vs_trained_pooling, other)}
                               for p, other in others.items() if other in result.spaces},
        }
    summary["methods"] = methods
    return summary


# ----------------------------------------------------------------------------------------------
# Two runs side by side


def _report(run: Path) -> dict[str, Any]:
    path = run / "species.json"
    if not path.is_file():
        raise SystemExit(f"species.py: no species.json in {run}: --compare, --table and --rescore take folders this script wrote")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"species.py: {path} is not this script's JSON: {error}") from error


def _scored_pooling(space: dict[str, Any], pooling: str | None) -> dict[str, Any] | None:
    """A method's scores for `pooling` (None: the pooling it trained), or None where it was not scored."""
    if pooling is None or pooling == space["pooling"]:
        return space
    return space.get("other_poolings", {}).get(pooling)


def compare_runs(run: Path, reference_run: Path, pooling: str | None = None) -> dict[str, Any]:
    """Each method's space in `run` against the same method's in `reference_run`, paired over the
    groups of every labelled set both scored (`validate.paired_between_runs`). Two seeds of one
    recipe measure training noise: a difference between recipes smaller than theirs is not one.
    The spaces are the poolings each run trained, or `pooling` in both: two recipes read the same
    way, which separates what training changed from how its tokens are read."""
    if pooling is not None and pooling not in POOLINGS:
        raise SystemExit(f"species.py: --pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    report, reference = _report(run), _report(reference_run)
    sets: dict[str, Any] = {}
    for name in sorted(set(report["sets"]) & set(reference["sets"])):
        ours, theirs = report["sets"][name]["methods"], reference["sets"][name]["methods"]
        methods: dict[str, Any] = {}
        for method in sorted(set(ours) & set(theirs)):
            if ours[method].get("missing") or theirs[method].get("missing"):
                continue
            our_scores, their_scores = _scored_pooling(ours[method], pooling), _scored_pooling(theirs[method], pooling)
            if our_scores is None or their_scores is None:
                unscored = run if our_scores is None else reference_run
                raise SystemExit(f"species.py: {unscored} did not score {method} with {pooling} pooling on "
                                 f"{name}: score it with --rescore first")
            our_pooling, their_pooling = pooling or ours[method]["pooling"], pooling or theirs[method]["pooling"]
            key = validate.space_key(f"ssl_{method}", our_pooling)
            reference_key = validate.space_key(f"ssl_{method}", their_pooling)
            try:
                table = validate.paired_between_runs(run / "validation" / name, key,
                                                     reference_run / "validation" / name, reference_key,
                                                     n_bootstrap=ARGS.n_bootstrap)
            except (KeyError, ValueError, OSError) as error:
                raise SystemExit(f"species.py: cannot pair {method} on {name}: {error}") from error
            headline = {short: our_scores.get(short) for short in HEADLINE_METRICS.values()}
            reference_headline = {short: their_scores.get(short) for short in HEADLINE_METRICS.values()}
            methods[method] = {"pooling": our_pooling, "reference_pooling": their_pooling,
                               "trained_pooling": ours[method]["pooling"],
                               "reference_trained_pooling": theirs[method]["pooling"],
                               "run": headline, "reference_run": reference_headline,
                               "difference": _differences(table),
                               "interval_method": str(table["interval_method"].iloc[0])}
        if methods:
            sets[name] = methods
    if not sets:
        raise SystemExit(f"species.py: {run} and {reference_run} share no scored method on any labelled set")
    return {"benchmark": "species_compare", "command": [sys.executable, *sys.argv], **git_state(REPO),
            "run": str(run), "reference_run": str(reference_run),
            "run_command": report["command"], "reference_command": reference["command"], "sets": sets}


# ----------------------------------------------------------------------------------------------
# Many runs as one table


def _interval(values: list[float]) -> str:
    return f"[{values[0]:+.2f}, {values[1]:+.2f}]"


def table_rows(runs: list[Path], set_names: list[str] | None) -> dict[str, Any]:
    """One row per run and method: per labelled set the scores the ablation reports. The sets are
    `set_names` in that order, else every set any run scored (sorted). Log-mel statistics are the
    same windows' in every run that scored the same windows; where they differ between runs, the
    runs scored different windows (another --top-k or data) and `logmel_differs` names the set."""
    reports = {run: _report(run) for run in runs}
    names = set_names or sorted({name for report in reports.values() for name in report["sets"]})
    references: dict[str, dict[str, Any]] = {}
    logmel_differs: list[str] = []
    rows: list[dict[str, Any]] = []
    for run, report in reports.items():
        for method, trained in report["methods"].items():
            row: dict[str, Any] = {"run": run.name, "method": method, "steps": trained.get("steps"),
                                   "stopped": trained.get("stopped"), "sets": {}}
            for name in names:
                scored = report["sets"].get(name)
                if scored is None:
                    continue
                reference = references.setdefault(name, {"logmel": scored["logmel"], "birdnet": scored.get("birdnet")})
                if scored["logmel"].get("knn") != reference["logmel"].get("knn") and name not in logmel_differs:
                    logmel_differs.append(name)
                if reference["birdnet"] is None and scored.get("birdnet"):
                    reference["birdnet"] = scored["birdnet"]
                space = scored["methods"].get(method)
                if not space or space.get("missing"):
                    continue
                row["pooling"] = space["pooling"]
                row["sets"][name] = {"in_pool": scored.get("in_pool", True), "knn": space["knn"],
                                     "vs_logmel_knn": space["vs_logmel"]["knn"],
                                     "vs_logmel_knn_interval": space["vs_logmel"]["knn_interval"],
                                     "nmi": space.get("nmi"), "untrained_knn": space["untrained"]["knn"]}
            rows.append(row)
    return {"benchmark": "species_table", "command": [sys.executable, *sys.argv], "sets": names,
            "references": references, "logmel_differs": logmel_differs, "rows": rows}


def table_markdown(table: dict[str, Any]) -> list[str]:
    """The rows of `table_rows` as Markdown: reference lines, then a header and a row per run and method."""
    lines = []
    for name in table["sets"]:
        reference = table["references"].get(name)
        if reference is None:
            continue
        logmel, birdnet = reference["logmel"], reference["birdnet"]
        text = f"{name}: log-mel statistics kNN {logmel['knn']:.3f}, NMI {logmel['nmi']:.3f}"
        if birdnet:
            text += f"; BirdNET kNN {birdnet['knn']:.3f}, NMI {birdnet['nmi']:.3f}"
        lines.append(text + (" (runs scored different windows: compare within runs only)"
                             if name in table["logmel_differs"] else ""))
    lines.append("")
    header = "| run (`--tag`) | space | " + " | ".join(
        f"{name} kNN (vs log-mel [95 % int.]) | NMI | untrained kNN" for name in table["sets"]) + " |"
    lines += [header, "|---|---|" + "---|---|---|" * len(table["sets"])]
    for row in table["rows"]:
        cells = []
        for name in table["sets"]:
            scores = row["sets"].get(name)
            if scores is None:
                cells += ["not scored", "", ""]
                continue
            held_out = "" if scores.get("in_pool", True) else ", held out of the pool"
            cells += [f"{scores['knn']:.3f} ({scores['vs_logmel_knn']:+.3f} {_interval(scores['vs_logmel_knn_interval'])}"
                      f"{held_out})",
                      "" if scores["nmi"] is None else f"{scores['nmi']:.3f}", f"{scores['untrained_knn']:.3f}"]
        space = f"{row['method']} · {row.get('pooling', '-')}" + (" (stopped)" if row["stopped"] else "")
        lines.append(f"| `{row['run']}` | {space} | " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------------------------


def score_run(run_dir: Path, methods: list[str], held_out: list[str]) -> dict[str, Any]:
    """Every labelled set scored in each method's checkpoint under `run_dir` (in the pooling it
    trained, `checkpoint.embedding_pooling`) and in its untrained copy."""
    checkpoints: dict[str, Path] = {}
    poolings: dict[str, str] = {}
    for method in methods:
        checkpoint = run_dir / method / "checkpoint.pth"
        if not checkpoint.is_file():
            log(f"{method}: no checkpoint to score")
            continue
        poolings[method] = load_checkpoint(checkpoint).get("embedding_pooling") or "mean"
        checkpoints[method] = checkpoint
        checkpoints[f"untrained_{method}"] = save_untrained_copy(checkpoint, run_dir / f"untrained_{method}.pth")
    return {name: score_set(name, folder, checkpoints, poolings, run_dir / "validation" / name,
                            in_pool=name not in held_out)
            for name, folder in labelled_sets(ARGS.data, ARGS.sets).items()}


def rescore_run(run_dir: Path) -> dict[str, Any]:
    """`--rescore`: a finished run's species.json with its sets scored again by this checkout."""
    report = _report(run_dir)
    started = time.perf_counter()
    # The windows and intervals of the run's own command, so a space scored before is scored on
    # the same windows again; --data and --sets are this call's (the data may have moved).
    recorded = parse_args([str(a) for a in report["command"][2:]])
    for option in ("top_k", "n_bootstrap", "no_birdnet"):
        setattr(ARGS, option, getattr(recorded, option))
    held_out = list(report.get("pool", {}).get("held_out_sets", []))
    sets = score_run(run_dir, list(report["methods"]), held_out)
    result = {**report, "sets": sets, "out": str(run_dir),
              "rescored": {"command": [sys.executable, *sys.argv], **git_state(REPO), "threads": ARGS.threads,
                           "wall_s": round(time.perf_counter() - started, 1), "torch": torch.__version__}}
    (run_dir / "species.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    if ARGS.rescore:
        torch.set_num_threads(ARGS.threads)
        print(json.dumps(rescore_run(ARGS.rescore), separators=(",", ":"), allow_nan=True))
        return 0
    if ARGS.compare:
        print(json.dumps(compare_runs(*ARGS.compare, pooling=ARGS.pooling), separators=(",", ":"), allow_nan=True))
        return 0
    if ARGS.table:
        table = table_rows(ARGS.table, [name.strip() for name in ARGS.sets.split(",")] if ARGS.sets else None)
        print("\n".join(table_markdown(table)))
        print(json.dumps(table, separators=(",", ":"), allow_nan=True))
        return 0
    torch.set_num_threads(ARGS.threads)
    started = time.perf_counter()
    out = ARGS.out
    run_dir = out / ARGS.tag if ARGS.tag else out
    if not (ARGS.data / "labelled").is_dir():
        raise SystemExit(f"species.py: no labelled/ under {ARGS.data} (pass --data)")

    held_out = list(labelled_sets(ARGS.data, ARGS.hold_out)) if ARGS.hold_out else []
    store, pool = tile_pool(ARGS.data, out, ARGS.pool_max_files, held_out)
    params = profile_parameters(ARGS.profile, "03", REPO)
    methods = ARGS.methods.split(",") if ARGS.methods else list(params["methods"])
    params.update(device=ARGS.device, n_threads=ARGS.threads, num_workers=0 if ARGS.device == "cpu" else 8)
    settings = launch.train_settings_from_parameters(store, **params)
    overrides = merge_mappings(params["method_overrides"], parse_overrides(ARGS.overrides, methods))

    trained = {method: train_method(method, settings, overrides, run_dir / method) for method in methods}
    sets = score_run(run_dir, methods, held_out)
    result = {
        "benchmark": "species", "command": [sys.executable, *sys.argv], **git_state(REPO),
        "profile": ARGS.profile, "overrides": overrides, "device": ARGS.device, "threads": ARGS.threads,
        "budget_min": ARGS.budget_min, "steps_given": ARGS.steps, "pool": pool, "methods": trained,
        "sets": sets, "out": str(run_dir), "wall_s": round(time.perf_counter() - started, 1),
        "torch": torch.__version__, "packages": {k: v for k, v in package_versions().items()
                                                 if k in ("timm", "scikit-learn", "numpy")},
    }
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "species.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":"), allow_nan=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
