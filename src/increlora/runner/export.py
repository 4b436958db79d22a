"""``increlora export``: a saved adapter to the PEFT LoRA format, or merged into the model."""

from __future__ import annotations

from pathlib import Path

from ..adapter import CONFIG_FILE, load_adapter
from ..config import ConfigError
from ..io import atomic_directory
from ..tasks import get_task, is_causal
from .evaluate import EvalSettings
from .model import load_model


def export_adapter(
    adapter_dir: str | Path, settings: EvalSettings, output: str | Path, fmt: str
) -> Path:
    """Write ``output``: ``fmt="peft"`` (increlora adapters only) or ``fmt="merged"``.

    A merged model is the base with every update folded into its weights and the trained
    head in place, saved with ``save_pretrained`` together with its tokenizer: it loads with
    ``AutoModelForSequenceClassification.from_pretrained`` (causal-LM tasks:
    ``AutoModelForCausalLM``) and needs neither increlora nor peft.
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    try:
        task = get_task(settings.task)
    except KeyError as err:
        raise ConfigError(f"--task: {err.args[0]}") from None
    loaded = load_model(settings.model, task)
    own = (adapter_dir / CONFIG_FILE).is_file()
    if fmt == "peft":
        if not own:
            raise ConfigError(f"{adapter_dir}: --format peft converts increlora adapters only")
        load_adapter(loaded.model, adapter_dir).export_peft(
            output,
            base_model_name_or_path=loaded.resolved.path,
            task_type="CAUSAL_LM" if is_causal(task) else "SEQ_CLS",
        )
        return output
    if own:
        merged = load_adapter(loaded.model, adapter_dir).merge_and_unload()
    elif (adapter_dir / "adapter_config.json").is_file():
        from ..methods.peft_reference import load_peft_adapter

        merged = load_peft_adapter(loaded.model, adapter_dir).merge_and_unload()
    else:
        raise FileNotFoundError(
            f"{adapter_dir}: no adapter_config.json (PEFT) or {CONFIG_FILE} (increlora) here"
        )
    with atomic_directory(output) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    return output
