# soundscape-ssl: `make demo` runs the whole study on the synthetic archive, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
RUN_ID ?=
PYTEST_ARGS ?=

.PHONY: setup demo test lab bench gpu-check figures clean-runs

# The stamp is rebuilt whenever pyproject.toml changes, so a `git pull` that adds a
# dependency reinstalls on the next make.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (soundscape-ssl)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/soundscape-ssl run --profile $(PROFILE) $(if $(RUN_ID),--run-id $(RUN_ID))

# `make figures`: the published set in figures/. Reruns the demo's reference run from scratch
# (11 min 20 s on 2 quiet CPU cores, measured), then copies its curated PNGs and writes figures/README.md
# (report/published.py); the same commit gives the same files.
FIGURES_RUN_ID ?= reference
figures: setup
	rm -rf runs/$(FIGURES_RUN_ID)
	$(VENV)/bin/soundscape-ssl run --profile demo --run-id $(FIGURES_RUN_ID)
	$(VENV)/bin/soundscape-ssl figures runs/$(FIGURES_RUN_ID) --out figures

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# The `bench` extra (librosa and faiss-cpu: baselines the benchmarks measure against; scikit-maad, the other, is a runtime dependency).
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --disable-pip-version-check -e ".[test,bench]"
	touch $@

# `make bench` runs every script in benchmarks/ at a small size (about two minutes on 2 CPU
# cores; each prints its JSON line). `make bench BENCH_QUICK=` runs them at their own default
# sizes (what their docstrings report); BENCH_DEVICE=cuda measures on the GPU.
BENCH_QUICK ?= 1
BENCH_DEVICE ?= cpu
BENCHMARKS := $(sort $(basename $(notdir $(wildcard benchmarks/*.py))))
BENCH_ARGS_birdnet := --windows 8 --batch-size 4 --repeats 1 --baseline-windows 4 --archive-windows 8 --file-s 12
BENCH_ARGS_cluster := --n-rows 5000 --dims 64 --components 10 --n-clusters 10 --fit-subsample 2000 \
	--repeats 1 --umap-rows 2000 --umap-subsample 500 --umap-repeats 1
BENCH_ARGS_embed := --base-tiles 40 --copies 2 --repeats 1 --model-batches 2 --batch-size 16 \
	--chunk-tiles 32 --num-workers 1
BENCH_ARGS_indices := --files 2 --file-s 15 --repeats 1 --embed-batches 1
BENCH_ARGS_inventory := --n-files 500 --n-recorders 5 --baseline-files 100 --threads 1,2 --repeats 1 --modes warm
BENCH_ARGS_pretrain := --model vit_tiny --depth 2 --batch-size 4 --dino-out-dim 1024 --local-crops 2 \
	--steps 2 --repeats 1 --loader-batches 2 --matmul-size 256
BENCH_ARGS_scale := --sizes 300 600 --embed-sizes 300 --n-bootstrap 50 --work-dir runs/scale-quick
BENCH_ARGS_tiling := --minutes 1 --file-s 30 --repeats 1 --png-repeats 1 --png-minutes 0.25 --skip-memory
BENCH_ARGS_search := --rows 20000 --dims 256 --components 20 --queries 5 --batch 16 --batch-repeats 1
# species: a sliver of the pool, two steps, one labelled set (its own default is 20 min per method).
# labelling: needs a finished demo run (make figures); skipped with a JSON line when there is none.
BENCH_ARGS_labelling := --run runs/$(FIGURES_RUN_ID) --largest 5 --skip-missing-run --out runs/labelling-quick
BENCH_ARGS_species := --pool-max-files 4 --steps 2 --methods vicreg --sets xeno-canto-phoebe-10sp \
	--no-birdnet --n-bootstrap 40 --out runs/species-quick
BENCH_DEVICE_ARGS_embed := --device $(BENCH_DEVICE)
BENCH_DEVICE_ARGS_pretrain := --device $(BENCH_DEVICE)
BENCH_DEVICE_ARGS_tiling := --device $(BENCH_DEVICE)
BENCH_DEVICE_ARGS_species := --device $(BENCH_DEVICE)

bench: $(VENV)/.bench-installed
	$(foreach name,$(BENCHMARKS),$(PY) benchmarks/$(name).py $(BENCH_DEVICE_ARGS_$(name)) \
		$(if $(BENCH_QUICK),$(BENCH_ARGS_$(name))) && ) true

# `make gpu-check`: the prepared GPU check on a GPU node (benchmarks/gpu_check.sh: the GPU tests,
# the pretrain, embed and tiling benchmarks, a poster-profile slice; at most ~8 min), one JSON
# summary in runs/gpu-check/summary.json. It installs nothing (no `setup`: a GPU node may be
# offline). `make gpu-check GPU_CHECK_ARGS="--device cpu --tiny"` is its dry run, which CI runs.
GPU_CHECK_ARGS ?=
gpu-check:
	benchmarks/gpu_check.sh $(if $(wildcard $(PY)),--python $(PY)) $(GPU_CHECK_ARGS)

clean-runs:
	rm -rf runs/
