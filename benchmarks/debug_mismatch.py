import torch, sys
sys.path.insert(0, ".")
from benchmarks.gpu_quantize import experts
from stepquant.formats import FORMATS, nvfp4_codes
nv = FORMATS["nvfp4"]
w = experts(32, seed=0)
for e in range(32):
    amax = w[e].float().abs().amax()
    g = nv.quantize(w[e], amax); c = nv.quantize(w[e].cpu(), amax.cpu())
    dq = (g["weight"].cpu() != c["weight"]); ds = (g["weight_scale"].cpu().view(torch.uint8) != c["weight_scale"].view(torch.uint8))
    if dq.any() or ds.any():
        print("expert", e, "code diffs", int(dq.sum()), "scale diffs", int(ds.sum()), "ws2", float(g["weight_scale_2"]), float(c["weight_scale_2"]))
        if ds.any():
            r, b = ds.nonzero()[0].tolist()
            blk = w[e].cpu()[r, 16*b:16*b+16].float()
            ws2 = c["weight_scale_2"]
            s = blk.abs().amax() / (6.0 * ws2)
            print(" block amax", blk.abs().amax().item(), "s", s.item(), s.item().hex(), "sf gpu", g["weight_scale"].cpu()[r,b].float().item(), "cpu", c["weight_scale"][r,b].float().item())
        if dq.any():
            r, k = dq.nonzero()[0].tolist()
            b = (2*k)//16
            blk = w[e].cpu()[r, 16*b:16*b+16].float(); ws2 = c["weight_scale_2"]
            sf = c["weight_scale"][r, b].float()
            x = blk / (sf * ws2)
            print(" codes gpu", hex(g["weight"].cpu()[r,k].item()), "cpu", hex(c["weight"][r,k].item()), "x pair", x[(2*k)%16:(2*k)%16+2].tolist(), "w", blk[(2*k)%16:(2*k)%16+2].tolist())
        break
for fmt in ("fp8", "fp8-block"):
    amax = w[0].float().abs().amax()
    g, c = FORMATS[fmt].quantize(w[0], amax), FORMATS[fmt].quantize(w[0].cpu(), amax.cpu())
    for s in c:
        a, b = g[s].cpu(), c[s]
        if a.element_size() == 1: a, b = a.view(torch.uint8), b.view(torch.uint8)
        d = (a != b)
        print(fmt, s, "diffs", int(d.sum()), "of", d.numel())
        if d.any() and s == "weight":
            idx = d.nonzero()[0].tolist()
            val = w[0].cpu()[tuple(idx)]
            print("  w", val.item(), "gpu", g[s].cpu()[tuple(idx)].float().item(), "cpu", c[s][tuple(idx)].float().item(), "scale", (c.get("weight_scale", c.get("weight_scale_inv"))).reshape(-1)[0].item())
