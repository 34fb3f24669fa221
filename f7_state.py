from common import *
lm = jaxaccel.load("builtin:default")
P = prompts_set(lm)[:5]
N = 20
ref = run(lm, P, max_new_tokens=N)
# hot start: repeated calls, and with different batch sizes
for i in range(3):
    o = run(lm, P, max_new_tokens=N, method="recycling", template="paper", hot_start=True)
    cmp(f"hot_start call {i} acc={o.stats['mean_accepted']:.2f}", ref.tokens, o.tokens, P)
o = run(lm, P[:1], max_new_tokens=N, method="recycling", template="paper", hot_start=True)
cmp("hot_start b1", ref.tokens[:1], o.tokens, P)
# method_output -> method_input chaining, batch rows [b,V,k]
o1 = run(lm, P, max_new_tokens=N, method="recycling", template=[2, 2], k=2)
mo = np.asarray(o1.method_output)
print("method_output shape", mo.shape, mo.dtype)
o2 = run(lm, P, max_new_tokens=N, method="recycling", template=[2, 2], k=2, method_input=mo)
if o2: cmp("method_input full [b,V,k]", ref.tokens, o2.tokens, P)
o2 = run(lm, P, max_new_tokens=N, method="recycling", template=[2, 2], k=2, method_input=mo[0])
if o2: cmp("method_input row0", ref.tokens, o2.tokens, P)
# nonsense matrix: random token ids, out of range ids, float
bad = np.random.default_rng(0).integers(-1, 4096, (4096, 2))
o2 = run(lm, P, max_new_tokens=N, method="recycling", template=[2, 2], k=2, method_input=bad)
if o2: cmp("method_input random", ref.tokens, o2.tokens, P)
oob = np.full((4096, 2), 5000)
o2 = run(lm, P, max_new_tokens=N, method="recycling", template=[2, 2], k=2, method_input=oob)
if o2: cmp("method_input oob ids", ref.tokens, o2.tokens, P)
big = np.full((4096, 2), 2**40, np.int64)
o2 = run(lm, P, max_new_tokens=N, method="recycling", template=[2, 2], k=2, method_input=big)
if o2: cmp("method_input int64 huge", ref.tokens, o2.tokens, P)
fl = np.full((4096, 2), 0.7, np.float32)
o2 = run(lm, P, max_new_tokens=N, method="recycling", template=[2, 2], k=2, method_input=fl)
if o2: cmp("method_input float 0.7", ref.tokens, o2.tokens, P)
# chain recycling with input
o2 = run(lm, P, max_new_tokens=N, method="chain", k=3, draft="recycling", method_input=mo[0][:, :1])
if o2: cmp("chain recycling input", ref.tokens, o2.tokens, P)
# interleaving methods then AR again
for c in [dict(method="pld"), dict(method="sps", budget=2), dict(method="autoregressive")]:
    o = run(lm, P, max_new_tokens=N, **c)
    cmp(f"after-interleave {c}", ref.tokens, o.tokens, P)
# sampling call in between then greedy
o = lm.generate(P, max_new_tokens=N, temperature=0.8, method="sps", budget=2)
o = run(lm, P, max_new_tokens=N, method="sps", budget=2)
cmp("greedy sps after sampled sps", ref.tokens, o.tokens, P)
o = run(lm, P, max_new_tokens=N, method="dyspec", budget=5)
cmp("dyspec after", ref.tokens, o.tokens, P)
# temperature tiny -> greedy
o = lm.generate(P, max_new_tokens=N, temperature=1e-6, method="recycling")
cmp("temp 1e-6 recycling", ref.tokens, o.tokens, P)
o = lm.generate(P, max_new_tokens=N, temperature=0, top_k=1, method="pld")
cmp("temp0 top_k=1 pld", ref.tokens, o.tokens, P)
o = lm.generate(P, max_new_tokens=N, temperature=1.0, top_k=1, method="pld")
cmp("temp1 top_k=1 pld (should equal greedy)", ref.tokens, o.tokens, P)
o = lm.generate(P, max_new_tokens=N, temperature=1.0, top_k=1, method="sps", budget=3)
cmp("temp1 top_k=1 sps (should equal greedy)", ref.tokens, o.tokens, P)
o = lm.generate(P, max_new_tokens=N, temperature=1.0, top_k=1)
cmp("temp1 top_k=1 AR (should equal greedy)", ref.tokens, o.tokens, P)
# prompts formats
o = lm.generate(np.array([P[0][:3], P[1][:3]], np.int64), max_new_tokens=4)
o2 = lm.generate([P[0][:3], P[1][:3]], max_new_tokens=4)
cmp("np2d vs list", o2.tokens, o.tokens)
o = lm.generate(tuple(tuple(p) for p in P), max_new_tokens=N)
cmp("tuple of tuples", ref.tokens, o.tokens, P)
o = lm.generate([P[0]] * 5, max_new_tokens=N, method="recycling", template="paper")
cmp("dup prompts", [ref.tokens[0]] * 5, o.tokens)
