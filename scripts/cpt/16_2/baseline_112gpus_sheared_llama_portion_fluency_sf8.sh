#!/usr/bin/bash
# LLaMA-MoE 2/16 experts, scale factor 8: continual pre-training on SlimPajama with the
# Sheared-LLaMA domain portions (static), 14 nodes x 8 GPUs, 200B tokens.
#
#   megamoe check scripts/cpt/16_2/baseline_112gpus_sheared_llama_portion_fluency_sf8.sh
#   sbatch scripts/cpt/16_2/baseline_112gpus_sheared_llama_portion_fluency_sf8.sh
#
# Every variable below can be overridden from the environment, e.g.
#   pretrained_model=/my/LlamaMoE-16Select2 dataset_dir=/my/data sbatch scripts/cpt/16_2/...sh
# Outputs: outputs/<job-name>-<job-id>/ (tensorboard in its runs/); logs in logs/ (mkdir -p logs).

#SBATCH --job-name=cpt-llama-moe-16_2-sf8-112gpus
#SBATCH --partition=MoE
#SBATCH --output=logs/%x-%j.log
#SBATCH --error=logs/%x-%j.log
#SBATCH --open-mode=append
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --nodes=14
#SBATCH --gres=gpu:8
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

num_nodes=${num_nodes:-14}                # must be the same as --nodes
num_gpu_per_node=${num_gpu_per_node:-8}   # must agree with --gres=gpu:N

comment=${comment:-"llama 2 7B, random split 2/16, mlp gate, SF 8, sheared_llama data portion, 200B tokens"}
model_type=${model_type:-llama_moe}
pretrained_model=${pretrained_model:-/mnt/petrelfs/share_data/quxiaoye/models/LlamaMoEForCausalLM/Random/llama2_7B-16Select2-up_proj-Scale8.0}
tokenizer_model=${tokenizer_model:-/mnt/petrelfs/share_data/quxiaoye/models/llama2_7B/tokenizer.model}
dataset_dir=${dataset_dir:-/mnt/petrelfs/share_data/quxiaoye/SlimPajama-fluency-processed-agg}
validation_dir=${validation_dir:-/mnt/petrelfs/share_data/quxiaoye/data/llama1_7B_val_set_tokenized}
prob_map=${prob_map:-sheared_llama}
dynamic_data_selection=${dynamic_data_selection:-none}

num_selects=${num_selects:-2}
scale_factor=${scale_factor:-8.0}                     # #experts / #selected = 16 / 2
gate_balance_loss_weight=${gate_balance_loss_weight:-1e-2}
gate_type=${gate_type:-TopKBalancedNoisyGate}
gate_network_type=${gate_network_type:-mlp}

lr=${lr:-2e-4}
final_lr_portion=${final_lr_portion:-0.1}
per_device_train_batch_size=${per_device_train_batch_size:-8}
gradient_accumulation_steps=${gradient_accumulation_steps:-4}
block_size=${block_size:-4096}
max_tokens=${max_tokens:-200000000000}                # 200B
warmup_steps=${warmup_steps:-100}
eval_steps=${eval_steps:-340}
save_steps=${save_steps:-340}
save_total_limit=${save_total_limit:-2}
logging_steps=${logging_steps:-5}
seed=${seed:-1227}
bf16=${bf16:-true}
tensor_model_parallel_size=${tensor_model_parallel_size:-1}
pipeline_model_parallel_size=${pipeline_model_parallel_size:-1}
expert_model_parallel_size=${expert_model_parallel_size:-1}
output_dir=${output_dir:-}                            # empty: outputs/<job-name>-<job-id>

root=${MEGAMOE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}       # the megamoe checkout (submit from it)
exec bash "$root/scripts/launch.sh" \
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
