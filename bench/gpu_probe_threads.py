"""Eager decode on CUDA: the main thread against other threads. One GPU call, about 2 minutes.

    python3 bench/gpu_probe_threads.py   # on the GPU machine (a CPU run only checks that it works)

Question: why does eager `generate` run ~4x slower in any thread but the main one on CUDA (H200: 88-111
against 24-26 tokens/s, GPU 6-9 % busy)? Suspect, from PyTorch's source: cuDNN attention (preferred for SDPA
on sm90 with torch 2.11's cuDNN) keeps its graph cache per thread (aten/src/ATen/native/cudnn/MHA.cpp,
thread_local), keyed by sequence lengths; eager decode meets a new KV length at every token, so a thread
that has not seen those lengths builds a cuDNN graph per token on the CPU.
Each line: time per item, the calling thread's CPU share (user/sys) and minor page faults per item.
What the suspect predicts: the SDPA choice prints 3 (cuDNN); "new lengths" is slow in main, fast again in
main, slow in a new thread; the persistent thread is slow once, then fast; with cuDNN SDPA off, every thread
decodes as fast as main. If instead pure-Python calls or page faults differ between threads, look elsewhere.
"""
import os, sys, time, threading, resource, queue
jobs = queue.Queue()                                   # a persistent worker, started before torch exists
def _persistent():
    while True:
        fn, out, ev = jobs.get(); out.append(fn()); ev.set()
threading.Thread(target=_persistent, name="persistent", daemon=True).start()
import torch, torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
dev = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
def in_new(fn):
    out = []; t = threading.Thread(target=lambda: out.append(fn())); t.start(); t.join(); return out[0]
def in_persistent(fn):
    out, ev = [], threading.Event(); jobs.put((fn, out, ev)); ev.wait(); return out[0]
RUN = {"main": lambda fn: fn(), "new": in_new, "pers": in_persistent}
def usage(fn, unit=1e3):
    torch.set_num_threads(1)
    r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter(); n = fn()
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_THREAD)
    d = lambda k: getattr(r1, k) - getattr(r0, k)
    return f"{dt / n * unit:8.2f} usr{d('ru_utime') / dt:4.2f} sys{d('ru_stime') / dt:4.2f} flt{d('ru_minflt') / n:5.1f}"
def line(name, fn, where, unit=1e3):
    print(f"{name:40} {where:5}", RUN[where](lambda: usage(fn, unit)), flush=True)
H = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8) \
    if dev == "cuda" else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
dt = torch.bfloat16 if dev == "cuda" else torch.float32
q = torch.randn(1, H["num_attention_heads"], 1, H["hidden_size"] // H["num_attention_heads"], device=dev, dtype=dt)
kv = lambda L: torch.randn(1, H["num_key_value_heads"], L, q.shape[-1], device=dev, dtype=dt)
print("py", sys.version.split()[0], "torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), dev,
      torch.cuda.get_device_name() if dev == "cuda" else "", "| cudnn_sdp", torch.backends.cuda.cudnn_sdp_enabled(),
      "| decode SDPA choice (3=cuDNN 1=flash 2=efficient 0=math):",
      torch._fused_sdp_choice(q, kv(100), kv(100), enable_gqa=True),
      "| env", {k: v for k, v in os.environ.items() if "SDPA" in k or k.startswith(("CUDNN", "TORCH_CUDNN"))}, flush=True)
torch.manual_seed(0); torch.set_default_dtype(dt)
with torch.device(dev):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, max_position_embeddings=4096, **H)).eval()
torch.set_default_dtype(torch.float32)
def decode(tokens=32, prompt=24):
    ids = torch.randint(3, 1024, (1, prompt), device=dev)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=0)
    sync(); return tokens
def sdpa_new_lengths(L0, n=40):                         # one SDPA call per NEW kv length, as eager decode does
    for L in range(L0, L0 + n):
        k = kv(L); F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    sync(); return n
K = kv(300)
def sdpa_same_length(n=2000):
    for _ in range(n):
        F.scaled_dot_product_attention(q, K, K, enable_gqa=True)
    sync(); return n
def py_calls(n=300_000):
    f = lambda a: a
    for i in range(n):
        f(i)
    return n
line("sdpa, 40 new lengths (ms/call)", lambda: sdpa_new_lengths(500), "main")
line("sdpa, same 40 lengths again", lambda: sdpa_new_lengths(500), "main")
line("sdpa, same 40 lengths, new thread", lambda: sdpa_new_lengths(500), "new")
line("sdpa, one length x2000 (us/call)", sdpa_same_length, "main", 1e6)
line("sdpa, one length x2000 (us/call)", sdpa_same_length, "new", 1e6)
line("pure python call (us)", py_calls, "main", 1e6)
line("pure python call (us)", py_calls, "new", 1e6)
decode(8)
for where in ("main", "main", "new", "new", "pers", "pers", "pers"):
    line("decode 32 tokens, default SDPA (ms/token)", decode, where)
line("decode, main, prompt 40 (new lengths)", lambda: decode(32, 40), "main")
line("decode, main, prompt 40 again", lambda: decode(32, 40), "main")
torch.backends.cuda.enable_cudnn_sdp(False)
print("cuDNN SDPA off -> decode SDPA choice:", torch._fused_sdp_choice(q, kv(100), kv(100), enable_gqa=True), flush=True)
for where in ("main", "new", "new", "pers"):
    line("decode, cuDNN SDPA off (ms/token)", decode, where)
line("decode, cuDNN off, prompt 56, new thread", lambda: decode(32, 56), "new")
