#!/usr/bin/bash
# Full-parameter continual pre-training (fpt) of LLaMA-MoE 4/16 on one node of 8 GPUs, 100B tokens.
#
#   megamoe check scripts/cpt/fpt.sh
#   sbatch scripts/cpt/fpt.sh
#
# Every variable below can be overridden from the environment, e.g.
#   model_type=llama pretrained_model=/my/llama_7B sbatch scripts/cpt/fpt.sh
# Outputs: outputs/<job-name>-<job-id>/ (tensorboard in its runs/); logs in logs/ (mkdir -p logs).
# Outside Slurm, `bash scripts/cpt/fpt.sh` runs the same training through torchrun here.

#SBATCH --job-name=cpt-moe-fpt-bs16
#SBATCH --partition=MoE
#SBATCH --output=logs/%x-%j.log
#SBATCH --error=logs/%x-%j.log
#SBATCH --open-mode=append
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --nodes=1
#SBATCH --gres=gpu:8
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

num_nodes=${num_nodes:-1}                 # must be the same as --nodes
num_gpu_per_node=${num_gpu_per_node:-8}   # must agree with --gres=gpu:N

comment=${comment:-"llama 7B MoE 16 select 4 (l2_norm split), full-parameter cpt, 100B tokens"}
# Vanilla LLaMA:      model_type=llama     pretrained_model=/mnt/petrelfs/share_data/quxiaoye/models/llama_7B
# LLaMA with MoEfication:
model_type=${model_type:-llama_moe}
pretrained_model=${pretrained_model:-/mnt/petrelfs/share_data/quxiaoye/models/llama_7B_MoE_16Select4-l2_norm}
tokenizer_model=${tokenizer_model:-/mnt/petrelfs/share_data/quxiaoye/models/llama_7B/tokenizer.model}
dataset_dir=${dataset_dir:-/mnt/petrelfs/share_data/quxiaoye/SlimPajama_processed}
validation_dir=${validation_dir:-/mnt/petrelfs/share_data/quxiaoye/data/llama1_7B_val_set_tokenized}
prob_map=${prob_map:-sheared_llama}
dynamic_data_selection=${dynamic_data_selection:-none}

num_selects=${num_selects:-4}
scale_factor=${scale_factor:-4.0}                     # #experts / #selected = 16 / 4
gate_balance_loss_weight=${gate_balance_loss_weight:-1e-2}
gate_type=${gate_type:-TopKBalancedNoisyGate}
gate_network_type=${gate_network_type:-mlp}

lr=${lr:-1e-4}
final_lr_portion=${final_lr_portion:-0.1}
per_device_train_batch_size=${per_device_train_batch_size:-16}
gradient_accumulation_steps=${gradient_accumulation_steps:-2}
block_size=${block_size:-2048}
max_tokens=${max_tokens:-100000000000}                # 100B
warmup_steps=${warmup_steps:-2000}
eval_steps=${eval_steps:-1000}
save_steps=${save_steps:-1000}
save_total_limit=${save_total_limit:-3}
logging_steps=${logging_steps:-5}
seed=${seed:-1227}
bf16=${bf16:-true}
tensor_model_parallel_size=${tensor_model_parallel_size:-1}
pipeline_model_parallel_size=${pipeline_model_parallel_size:-1}
expert_model_parallel_size=${expert_model_parallel_size:-1}
output_dir=${output_dir:-}                            # empty: outputs/<job-name>-<job-id>

root=${MEGAMOE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}       # the megamoe checkout (submit from it)
exec bash "$root/scripts/launch.sh" \
    --training_mode fpt \
    --model_type "$model_type" \
    --pretrained_model "$pretrained_model" \
    --tokenizer_model "$tokenizer_model" \
    --dataset_dir "$dataset_dir" \
    --validation_dir "$validation_dir" \
    --prob_map "$prob_map" \
    --dynamic_data_selection "$dynamic_data_selection" \
    --num_selects "$num_selects" \
    --moe_calculator_score_scale_factor "$scale_factor" \
    --gate_balance_loss_weight "$gate_balance_loss_weight" \
    --gate_type "$gate_type" \
    --gate_network_type "$gate_network_type" \
    --learning_rate "$lr" \
    --final_lr_portion "$final_lr_portion" \
    --per_device_train_batch_size "$per_device_train_batch_size" \
    --gradient_accumulation_steps "$gradient_accumulation_steps" \
    --block_size "$block_size" \
    --max_tokens "$max_tokens" \
    --warmup_steps "$warmup_steps" \
    --eval_steps "$eval_steps" \
    --save_steps "$save_steps" \
    --save_total_limit "$save_total_limit" \
    --logging_steps "$logging_steps" \
    --seed "$seed" \
    --bf16 "$bf16" \
    --num_nodes "$num_nodes" \
    --num_gpu_per_node "$num_gpu_per_node" \
    --tensor_model_parallel_size "$tensor_model_parallel_size" \
    --pipeline_model_parallel_size "$pipeline_model_parallel_size" \
    --expert_model_parallel_size "$expert_model_parallel_size" \
    --output_dir "$output_dir" \
    --comment "$comment"
