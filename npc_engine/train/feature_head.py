"""Stage `head`: the feature-head drafter (npc_engine.head) trained on the finished target's hidden states.

Loss per position: KL(target || head) between the next-token distributions (the head's through the target's
own norm and output head) plus a smooth-L1 pull of the predicted feature toward the target's. Each batch runs
twice: teacher-forced on the target's features, then fed the head's own predictions one position back, as drafting
feeds it from the second draft on (the second pass's input is detached). Same data mix and mask as `distill`.
"""
import torch
import torch.nn.functional as F

from npc_engine.head import FeatureHead, head_args, head_logits, save_head
from npc_engine.loading import load_model
from npc_engine.model import Transformer
from npc_engine.train.batches import MixedSampler
from npc_engine.train.loop import Context, compile_layers, conversation_pools, count_params, mix_shares, record, train


def head_loss(target: Transformer):
    def loss(head: FeatureHead, x, y, m):
        positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        with torch.no_grad():
            features = target.hidden_states(x, positions)
            teacher = F.log_softmax(head_logits(target, features).float(), dim=-1)
        before = F.pad(features[:, :-1], (0, 0, 1, 0))  # zeros before position 0
        weight, total = m.sum().clamp(min=1), 0.0
        for _ in range(2):
            predicted = head(target, x, before)
            logp = F.log_softmax(head_logits(target, predicted).float(), dim=-1)
            kl = F.kl_div(logp, teacher, log_target=True, reduction="none").sum(-1)
            pull = F.smooth_l1_loss(predicted.float(), features.float(), reduction="none").mean(-1)
            total = total + ((kl + pull) * m).sum() / weight
            before = F.pad(predicted[:, :-1].detach(), (0, 0, 1, 0))
        return total / 2
    return loss


def train_head(ctx: Context) -> dict:
    stage = ctx.config.head
    target = load_model(ctx.out / "npc-target", ctx.device, torch.float32)
    compile_layers(target, stage.compile and ctx.device.type == "cuda")
    torch.manual_seed(ctx.seed + 3)
    head = FeatureHead(head_args(target.args)).to(ctx.device)
    torch.nn.init.normal_(head.fc.weight, 0.0, 0.02)
    ctx.log(f"head: {count_params(head):,} parameters on the target's features")
    sampler = MixedSampler(conversation_pools(ctx.work, stage.block_size), mix_shares(ctx.config), stage.batch_size,
                           stage.block_size, ctx.seed + 3, ctx.device)
    info = train("head", head, head_loss(target), sampler, stage, ctx)
    save_head(head, ctx.out / "npc-head", target_name="npc-target")
    return record(ctx, "head", {**info, "parameters": count_params(head)})
