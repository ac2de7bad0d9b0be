"""lit_robust.objectives: each defense's outer loss as a function, the very one the defense calls, so a user's own
training_step computes the defense's numbers bit for bit."""

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from digits_bench import EPS, quiet_trainer, tiny_defense
from torch.utils.data import DataLoader, TensorDataset

from lit_robust import objectives
from lit_robust.attacks import TradesKLAttack
from lit_robust.models import SmallCNN


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return x, (x + 0.1 * torch.rand(x.shape, generator=g)).clamp(0, 1), torch.randint(0, 10, (n,), generator=g)


CASES = {  # defense name and its arguments -> (function, keyword arguments)
    "PGDAT": ({"label_smoothing": 0.1}, objectives.pgd_at_objective, {"label_smoothing": 0.1}),
    "TRADES": ({"beta": 3.0, "label_smoothing": 0.1}, objectives.trades_objective, {"beta": 3.0, "label_smoothing": 0.1}),
    "MART": ({"beta": 5.0}, objectives.mart_objective, {"beta": 5.0}),
    "InterpolatedAT": ({"alpha": 0.5}, objectives.interpolated_at_objective, {"alpha": 0.5}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_function_is_the_defenses_outer_loss_bit_for_bit(name):
    defense_kwargs, function, kwargs = CASES[name]
    module = tiny_defense(name, **defense_kwargs).train()
    x, x_adv, y = _batch()
    torch.manual_seed(1)
    ours = module.outer_loss(x, x_adv, y)
    torch.manual_seed(1)
    theirs = function(module.model, x, x_adv, y, **kwargs)
    assert torch.equal(ours.loss, theirs.loss) and torch.equal(ours.adv_logits, theirs.adv_logits)
    if ours.clean_logits is not None:
        assert torch.equal(ours.clean_logits, theirs.clean_logits)


def test_the_formulas():
    """Written out independently: PGD-AT's CE, TRADES' CE + beta KL (batch mean), MART's BCE + weighted KL."""
    net = SmallCNN(width=4).eval()
    x, x_adv, y = _batch()
    with torch.no_grad():
        z, z_adv = net(x), net(x_adv)
    p, p_adv = z.softmax(1), z_adv.softmax(1)
    kl = (p * (p.log() - p_adv.log())).sum(1)
    assert objectives.pgd_at_loss(net, x, x_adv, y).item() == pytest.approx(F.cross_entropy(z_adv, y).item(), rel=1e-6)
    assert objectives.trades_loss(net, x, x_adv, y, beta=6.0).item() == pytest.approx(
        (F.cross_entropy(z, y) + 6.0 * kl.mean()).item(), rel=1e-5)
    wrong = p_adv.clone()
    wrong[torch.arange(len(y)), y] = -1
    bce = F.cross_entropy(z_adv, y) - torch.log(1.0001 - wrong.amax(1) + 1e-12).mean()
    mart = bce + 6.0 * (kl * (1.0000001 - p[torch.arange(len(y)), y])).mean()
    assert objectives.mart_loss(net, x, x_adv, y).item() == pytest.approx(mart.item(), rel=1e-5)


def test_the_class_pattern_binds_the_hyperparameters():
    net = SmallCNN(width=4).eval()
    x, x_adv, y = _batch()
    assert torch.equal(objectives.TradesLoss(beta=2.0)(net, x, x_adv, y), objectives.trades_loss(net, x, x_adv, y, 2.0))
    assert torch.equal(objectives.MARTLoss()(net, x, x_adv, y), objectives.mart_loss(net, x, x_adv, y))
    assert torch.equal(objectives.PGDATLoss(0.1)(net, x, x_adv, y), objectives.pgd_at_loss(net, x, x_adv, y, 0.1))
    assert "beta=2.0" in repr(objectives.TradesLoss(beta=2.0))


class OwnTrades(L.LightningModule):
    """A user's module: its own step with the TRADES attack and ``trades_loss``; AWP by hand if asked."""

    def __init__(self, net, awp_gamma=0.0):
        super().__init__()
        self.net = net
        self.attack = TradesKLAttack(EPS, steps=2, step_size=0.1)
        self.awp = objectives.WeightPerturbation(awp_gamma) if awp_gamma else None

    def training_step(self, batch, batch_idx):
        x, y = batch
        x_adv = self.attack(self.net, x, y)
        if self.awp is not None:
            self.awp.apply(self.net, lambda: objectives.trades_loss(self.net, x, x_adv, y, beta=6.0))
        return objectives.trades_loss(self.net, x, x_adv, y, beta=6.0)

    def on_after_backward(self):
        if self.awp is not None:
            self.awp.restore()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@pytest.mark.parametrize("awp_gamma", [0.0, 0.01])
def test_a_users_training_step_with_trades_loss_trains_exactly_as_trades(tmp_path, awp_gamma):
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.rand(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g))
    start = SmallCNN(width=4)
    own = OwnTrades(SmallCNN(width=4), awp_gamma)
    own.net.load_state_dict(start.state_dict())
    defense = tiny_defense("TRADES", awp_gamma=awp_gamma, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                           lr_scheduler=lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0))
    defense.model.load_state_dict(start.state_dict())
    for module in (own, defense):
        L.seed_everything(0)
        quiet_trainer(tmp_path, max_steps=3).fit(module, DataLoader(data, batch_size=16))
    assert all(torch.equal(a, b) for a, b in zip(own.net.state_dict().values(), defense.model.state_dict().values()))


def test_gaussian_augmentation_objective_is_the_defenses_loss():
    module = tiny_defense("GaussianAugmentation").train()
    x, _, y = _batch()
    torch.manual_seed(3)
    ours = module.training_loss(x, y)
    torch.manual_seed(3)
    theirs = objectives.gaussian_augmentation_objective(module.model, x, y, sigma=module.sigma)
    assert torch.equal(ours.loss, theirs.loss)
