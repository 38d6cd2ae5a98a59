"""LoRAMoE (Dou et al., ACL 2024): a routed mixture of LoRA experts beside frozen linears, trained with
the localized balancing constraint so that world knowledge survives fine-tuning.

    config = LoRAMoEConfig(num_experts=6, rank=4, groups=[3, 3], group_types=["world", "task"], lbc_weight=0.1)
    add_loramoe(model, config)                       # only adapters and routers train
    with routing_context(model, batch["attention_mask"], batch_types) as ctx:
        loss = model(**batch).loss + config.lbc_weight * ctx.balance_loss()
    save_loramoe(model, "adapter/");  load_loramoe(stock_model, "adapter/")
    export_peft(model, "peft/"); import_peft(stock_model, "peft/")   # where the mixture is plain LoRA
"""

from moe_unlearn.loramoe.balance import RoutingContext, localized_balance_loss, routing_context
from moe_unlearn.loramoe.config import LoRAMoEConfig
from moe_unlearn.loramoe.finetune import FinetuneConfig, FinetuneResult, finetune
from moe_unlearn.loramoe.layer import LoRAMoELinear
from moe_unlearn.loramoe.model import (
    adapter_parameters,
    add_loramoe,
    find_targets,
    get_loramoe_config,
    load_loramoe,
    loramoe_layers,
    merge_loramoe,
    save_loramoe,
)
from moe_unlearn.loramoe.observe import RoutingMassObserver, observe_routing
from moe_unlearn.loramoe.peft_io import export_peft, import_peft

__all__ = ["FinetuneConfig", "FinetuneResult", "LoRAMoEConfig", "LoRAMoELinear", "RoutingContext", "adapter_parameters", "add_loramoe", "export_peft", "find_targets",
           "get_loramoe_config", "import_peft", "load_loramoe", "localized_balance_loss", "loramoe_layers", "merge_loramoe",
           "observe_routing", "routing_context", "save_loramoe", "RoutingMassObserver", "finetune"]
