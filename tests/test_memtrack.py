"""The real-run peak meter against hand arithmetic and against PyTorch's own MemTracker."""

import torch
import torch.nn as nn
from torch.distributed._tools.mem_tracker import MemTracker

from costmodel.validate.meters import make_inputs, make_optimizer, measure, measure_inference, measure_peak, \
    measure_train_step
from costmodel.rules.optimizer import OPTIMIZERS

KB4 = 1024 * 4          # one float32 tensor of 1024 elements: 4096 bytes


def test_resident_plus_live_temporaries():
    x = torch.zeros(1024)
    # x, x + 1 and (x + 1) * 2 are live together after the multiply: 3 * 4096 = 12288
    assert measure_peak(lambda: (x + 1) * 2, resident=[x]) == 3 * KB4


def test_views_share_their_storage():
    x = torch.zeros(1024)
    # x.view(32, 32).t() is x's storage; adding 0 makes one new 4096-byte tensor: 8192
    assert measure_peak(lambda: x.view(32, 32).t() + 0, resident=[x]) == 2 * KB4


def test_in_place_ops_allocate_nothing():
    x = torch.zeros(1024)
    assert measure_peak(lambda: x.add_(1).mul_(2), resident=[x]) == KB4


def test_frees_are_seen():
    x = torch.zeros(1024)

    def f():
        a = x + 1
        del a               # freed before b exists
        return x + 2
    assert measure_peak(f, resident=[x]) == 2 * KB4


def test_linear_inference_by_hand():
    m = nn.Linear(64, 32, bias=False)
    # weight 32*64*4 = 8192, input 16*64*4 = 4096, output 16*32*4 = 2048: 14336
    r = measure_inference(m, ["x:float32[batch,64]"], {"batch": 16})
    assert r.peak_bytes == 8192 + 4096 + 2048


def test_inference_matches_memtracker():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(128, 64)
    tracker = MemTracker()
    tracker.track_external(net, x)
    with tracker, torch.no_grad():
        net(x)
    expected = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    def forward():
        with torch.no_grad():
            net(x)
    assert measure_peak(forward, resident=[*net.parameters(), x]) == expected


def test_train_step_matches_memtracker():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    opt = torch.optim.AdamW(net.parameters())
    x = torch.randn(128, 64)

    def step():
        net(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()    # the state exists from here on
    tracker = MemTracker()
    tracker.track_external(net, opt, x)
    with tracker:
        step()
    expected = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    state = [t for s in opt.state.values() for t in s.values()]
    assert measure(step, resident=[*net.parameters(), x, *state]).peak_bytes == expected


def test_train_step_helper_counts_state_grads_and_weights():
    torch.manual_seed(0)
    m = nn.Linear(64, 32, bias=False)
    r = measure_train_step(m, ["x:float32[batch,64]"], {"batch": 16}, optimizer="adamw")
    weight, state, grad = 8192, 2 * 8192 + 4, 8192     # adamw: exp_avg, exp_avg_sq, a float32 step
    assert r.peak_bytes >= weight + state + grad + 16 * 64 * 4
    sgd = measure_train_step(nn.Linear(64, 32, bias=False), ["x:float32[batch,64]"], {"batch": 16}, optimizer="sgd")
    assert r.peak_bytes - sgd.peak_bytes >= state      # sgd keeps no state


def test_every_optimizer_builds():
    p = [nn.Parameter(torch.zeros(4, 4))]
    for name in OPTIMIZERS:
        assert isinstance(make_optimizer(name, p), torch.optim.Optimizer)


def test_make_inputs_shapes_and_ranges():
    ids, img = make_inputs(["ids:int64[batch,seq]", "img:float32[batch,3,8,8]"], {"batch": 2, "seq": 5})
    assert ids.shape == (2, 5) and ids.dtype == torch.int64 and int(ids.max()) < 2
    assert img.shape == (2, 3, 8, 8)
