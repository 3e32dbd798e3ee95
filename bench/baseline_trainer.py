"""The baseline a user would write: transformers Trainer + peft on the same rendered data.

    python bench/baseline_trainer.py --dataset self_cognition.json --epochs 3 --batch 1 --accum 16 --max_length 512

Same model (Keel's embedded model folder), same rows, same chat-template rendering and label
masking (keel.data.mix.build_datasets), same LoRA config (r 8, alpha 32, dropout 0.05, all-linear),
same optimiser settings; rows are padded to the longest in the batch as DataCollatorForSeq2Seq does.
Prints one JSON line with the training seconds and peak RSS.
"""

import argparse
import json
import resource
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", nargs="+", required=True)
    p.add_argument("--data_dir")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--accum", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--model_name", nargs="+", default=["Keel Robot"])
    p.add_argument("--model_author", nargs="+", default=["Keel Lab"])
    a = p.parse_args()
    start = time.time()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from keel.data.mix import DataArgs, build_datasets
    from keel.model.load import ModelArgs, load_model

    torch.manual_seed(42)
    model, tok, _ = load_model(ModelArgs())
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    train, _, _ = build_datasets(DataArgs(dataset=a.dataset, data_dir=a.data_dir, split_dataset_ratio=0,
                                          max_length=a.max_length, model_name=a.model_name,
                                          model_author=a.model_author), tok)
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in train]
    args = TrainingArguments(output_dir="/tmp/keel-bench-baseline", per_device_train_batch_size=a.batch,
                             gradient_accumulation_steps=a.accum, learning_rate=a.lr, num_train_epochs=a.epochs,
                             lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.1, logging_steps=5,
                             save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                             dataloader_num_workers=0, seed=42, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.time()
    out = trainer.train()
    train_seconds = time.time() - t0
    print(json.dumps({"train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - start, 1),
                      "final_loss": round(out.training_loss, 4), "steps": out.global_step,
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)}))


if __name__ == "__main__":
    main()
