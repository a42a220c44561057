"""Reading pretraining logs (`log.jsonl`) and drawing loss, learning-rate and throughput curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def read_training_log(out_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[dict]]:
    """The `train` records of `out_dir/log.jsonl` as a table, and the other events (start, stopped).

    A resumed run appends to the same log; rows are kept in step order with the latest record
    of a step winning, so a step logged twice around a kill appears once.
    """
    path = Path(out_dir) / "log.jsonl"
    records, events = [], []
    with path.open() as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write; the rest is good
                continue
            (records if record.get("event") == "train" else events).append(record)
    table = pd.DataFrame(records)
    if not table.empty:
        table = table.drop_duplicates("step", keep="last").sort_values("step", ignore_index=True)
    return table, events


def training_summary(logs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per run: steps, first and last loss, median tiles/s and data-wait share."""
    rows = []
    for name, table in logs.items():
        if table.empty:
            rows.append({"run": name, "steps": 0})
            continue
        head = table["loss"].iloc[: max(1, len(table) // 10)].mean()
        tail = table["loss"].iloc[-max(1, len(table) // 10):].mean()
        rows.append({
            "run": name, "steps": int(table["step"].max()), "loss_first": float(head), "loss_last": float(tail),
            "loss_fell": bool(tail < head),
            "median_tiles_per_s": float(table["tiles_per_s"].median()),
            "median_data_wait_fraction": float(table.get("data_wait_fraction", pd.Series([np.nan])).median()),
        })
    return pd.DataFrame(rows)


def plot_training_curves(logs: Mapping[str, pd.DataFrame],
                         title: str = "Pretraining: loss and learning rate per method") -> Figure:
    """Loss and learning rate against step, one column per run (losses differ in scale).

    Throughput is a measurement of the machine, not of the training: it has its own figure
    (`plot_throughput`), so that this one is the same for the same training on any machine."""
    names = [name for name, table in logs.items() if not table.empty]
    figure = Figure(figsize=(3.6 * max(1, len(names)), 5.0), layout="constrained")
    grid = figure.subplots(2, max(1, len(names)), squeeze=False)
    for column, name in enumerate(names):
        table = logs[name]
        loss_axes, lr_axes = grid[:, column]
        loss_axes.plot(table["step"], table["loss"], color="C0")
        loss_axes.set_title(name)
        loss_axes.set_ylabel("loss")
        lr_axes.plot(table["step"], table["lr"], color="C1")
        lr_axes.set_ylabel("learning rate")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        lr_axes.set_xlabel("optimizer step")
    figure.suptitle(title)
    return figure


def plot_throughput(logs: Mapping[str, pd.DataFrame],
                    title: str = "Pretraining throughput on this machine") -> Figure:
    """Tiles per second (over all processes) against step, one line per run."""
    figure = Figure(figsize=(6.0, 3.2), layout="constrained")
    axes = figure.subplots()
    for name, table in logs.items():
        if not table.empty:
            axes.plot(table["step"], table["tiles_per_s"], marker=".", label=name)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("tiles / s")
    axes.set_ylim(bottom=0)
    if axes.get_lines():
        axes.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def plot_monitors(table: pd.DataFrame, columns: list[str], title: str) -> Figure:
    """Method-specific monitors (e.g. DINO's teacher entropy) against step, one panel each."""
    present = [c for c in columns if c in table.columns]
    figure = Figure(figsize=(3.4 * max(1, len(present)), 2.8), layout="constrained")
    axes_row = figure.subplots(1, max(1, len(present)), squeeze=False)[0]
    for axes, column in zip(axes_row, present):
        axes.plot(table["step"], table[column])
        axes.set_title(column.replace("_", " "), fontsize=9)
        axes.set_xlabel("optimizer step")
    figure.suptitle(title)
    return figure
