"""The typed configuration: every field a recipe or `--set` can touch, with its default.

Recipes (YAML in `recipes/`) state only what differs from these defaults or from their parent.
Sections a later method needs are added here as their own dataclass, never as free-form dicts.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run folder is out_dir/name
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs * steps_per_epoch
    stop_at: int = 0  # leave (with a checkpoint) after this step, keeping the full run's schedules (job time slices)
    log_every: int = 10
    ckpt_every: int = 500  # optimizer steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept in the run folder (0 = keep all)
    auto_resume: bool = False
    max_nonfinite: int = 20  # consecutive non-finite losses (micro-steps) before the run stops (checked at log lines)
    hang_timeout: float = 1800.0  # seconds without progress (batch, step, checkpoint) before a rank dumps its stacks and exits 6; 0 = never
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = from the device table (GPU) / not logged (CPU)
    overwrite: bool = False  # start over in a run folder that holds checkpoints (deletes them and the TensorBoard logs)
    sync_check: bool = False  # debug (GPU): count where micro-steps make the host wait for the device -> sync_check.json
    record_keys: bool = False  # debug: each rank appends the sample keys of every micro-step to keys/rank<r>.jsonl
    wandb: bool = False  # also log scalars, images, texts and the config to Weights & Biases (rank 0; pip install wandb)
    wandb_project: str = "vssl_ds"
    wandb_entity: str = ""  # "" = your default entity
    wandb_mode: str = ""  # online | offline (no network: sync later) | disabled; "" = WANDB_MODE or online


@dataclass
class DataConfig:
    train: str = ""  # manifest.json, brace pattern (train-{000000..000009}.tar) or pipe: URLs
    synthetic: bool = False  # train empty → write generated toy clips and train on them (only the embedded default)
    synthetic_dir: str = "data/synthetic"  # where the embedded default writes its shards when train is empty
    synthetic_clips: int = 64
    synthetic_task: str = "shape"  # what the generated clips' labels mean: vssl_ds.data.synthetic.TASKS
    synthetic_val_clips: int = 0  # > 0: also write that many labelled clips (another seed) to <synthetic_dir>_val
    # and use them as monitor.val when it is empty (the embedded default's kNN probe)
    epoch_size: int = 0  # samples per epoch when `train` has no manifest
    num_workers: int = 2
    batch_size: int = 8  # per device, per micro-step
    num_frames: int = 16
    sampling_rate: int = 4  # temporal stride between sampled frames
    size: int = 224
    scales: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.66])  # multi-scale crop
    short_video: str = "loop"  # clip shorter than num_frames*sampling_rate: loop | pad | skip
    shuffle_buffer: int = 256  # samples held per worker for shuffling (raw bytes: ~1 MB per 10 s clip at 320p)
    resampled: bool = False  # draw shards with replacement; the epoch length is epoch_size (or the manifest total)
    decoder: str = "pyav"  # pyav | decord | torchcodec (the others serve as fallbacks); pyav measures fastest per core
    decode_device: str = "cpu"  # cpu | cuda: videos decoded by torchcodec on the rank's GPU (NVDEC) and cropped,
    # resized and masked there; the workers only draw the frames, crops and masks (same as on the CPU path)
    view: str = "clip"  # clip | scale_crop | long_short | frame_pair | finetune | image (BEVT image-only stage; see data/views.py)
    repeats: int = 1  # repeated augmentation: samples drawn per video (batch_size must be a multiple)
    flip: float = -1.0  # horizontal flip probability of every training clip; -1 = the view's default (METHODS.md).
    # 0 for data with a left/right sense (SSv2's "pushing something from left to right"; the official VideoMAE / MVD
    # fine-tuning turns the flip off for SSV2)
    long_stride: int = 8  # long_short: stride of the long clip
    max_gap: int = 16  # frame_pair: most frames between the two frames
    short_range: list[int] = field(default_factory=lambda: [256, 320])  # scale_crop: short side before the crop
    targets: str = ""  # teacher-target cache (folder or targets.json from tools/cache_teachers.py), joined by key
    images: str = ""  # image shards for an image stream next to the videos (BEVT)
    image_batch_size: int = 0  # images per device per micro-step (0 = no image stream)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    prefetch: int = 2  # batches prefetched per worker
    exclude: str = ""  # file of sample keys to leave out, one per line (e.g. a video that kills its data worker)
    pin_memory: bool = True


@dataclass
class ModelConfig:
    name: str = "vit_base_video"
    img_size: int = 224
    num_frames: int = 16
    tubelet: int = 2
    patch: int = 16
    drop_path: float = 0.0
    attn_backend: str = "auto"  # auto | xformers | sdpa | math
    grad_ckpt: bool = False  # activation checkpointing per block
    compile: bool = False  # torch.compile each encoder block in place (GPU speed; the first steps compile)
    pretrained: str = ""  # local weight file (.pth/.safetensors) loaded into the encoder
    pos_embed: str = "sincos"  # sincos (VideoMAE's 1D table) | sincos3d (MVD's) | learned
    window: list[int] = field(default_factory=lambda: [8, 7, 7])  # Swin: attention window (t, h, w) in tokens
    swin_index: str = "official"  # Swin windows shrunk to a small input: official (released checkpoints) | window
    swin_image_path: str = "auto"  # BEVT images: official 2D path | video (1-frame clip) | auto (official at 224 px)
    # sizes other than the registered variant's (custom or debug models, checkpoints of other sizes); empty/0 = the
    # variant's. ViTs take one value for depth / num_heads, Swins one per stage.
    embed_dim: int = 0
    depth: list[int] = field(default_factory=list)
    num_heads: list[int] = field(default_factory=list)


@dataclass
class MAEConfig:
    mask: str = "tube"  # tube | random
    mask_ratio: float = 0.9
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    norm_pix_loss: bool = True  # targets: per-patch pixels normalised by the patch's mean/std


@dataclass
class MVDConfig:
    """Masked video distillation (Wang et al., CVPR 2023); values follow the official scripts."""
    mask: str = "tube"
    mask_ratio: float = 0.9
    image_teacher: str = "vit2d_base_patch16"  # a vssl_ds model name or timm:<name> (MAE-pretrained image ViT)
    image_teacher_weights: str = ""  # local file (vssl_ds never downloads)
    video_teacher: str = "vit_base_video"  # a vssl_ds model name or timm:<name> (VideoMAE-pretrained video ViT)
    video_teacher_weights: str = ""
    teacher_size: int = 0  # teachers' input size when it differs from data.size (e.g. 196 for ViT-H/14); 0 = same
    decoder_dim: int = 0  # 0 = encoder width (S/B); L: 512, H: 640
    decoder_depth: int = 2  # S/B: 2, L: 4, H: 8
    decoder_heads: int = 0  # 0 = encoder heads
    image_weight: float = 1.0
    video_weight: float = 1.0
    norm_targets: bool = False  # parameter-free LayerNorm on the teacher features
    loss: str = "smooth_l1"  # smooth_l1 | l2 | l1
    targets: str = "online"  # online: teachers run in the step | cache: read them from data.targets


@dataclass
class BEVTConfig:
    """BEVT (Wang et al., CVPR 2022); values follow the official config swin_base_patch244_window877_bevt_in1k_k400."""
    mask_ratio: float = 0.5  # video: one blockwise mask of 98 of 196 cells (16-px cells), over a 50–100 % tube
    image_mask_ratio: float = 0.5  # image: blockwise, 98 of 196
    min_block: int = 16  # smallest masked block, in cells (BEiT)
    tokenizer: str = "dalle"  # dalle (DALL-E dVAE encoder state dict) | kmeans (tools/fit_tokenizer.py)
    tokenizer_weights: str = ""
    video_weight: float = 1.0
    image_weight: float = 1.0
    targets: str = "online"  # online: the tokenizer runs in the step | cache: token ids from data.targets


@dataclass
class LSTCLConfig:
    """LSTCL (Wang et al., CVPR 2022). No public code: heads, temperature and momenta follow the frameworks
    (MoCo v3, BYOL, SimSiam papers); clip strides are reconstructed (recipes mark them)."""
    framework: str = "mocov3"  # mocov3 | byol | simsiam
    proj_hidden: int = 4096
    proj_dim: int = 256
    proj_layers: int = 3  # MoCo v3: 3, BYOL: 2, SimSiam: 3
    pred_hidden: int = 4096  # SimSiam: 512 (bottleneck)
    temperature: float = 0.2  # MoCo v3
    momentum: float = 0.99  # EMA start, cosine to 1 (MoCo v3 0.99, BYOL 0.996); unused by SimSiam
    symmetric: bool = False  # the paper's direction only (short → online, long → target); true adds long → short


@dataclass
class ViCMAEConfig:
    """ViC-MAE (Hernandez et al.): MAE on two frames + NT-Xent on their pooled visible tokens."""
    mask_ratio: float = 0.5
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    proj_hidden: int = 4096
    proj_dim: int = 128
    temperature: float = 0.1
    contrastive_weight: float = 0.03
    reconstruction_weight: float = 0.97


@dataclass
class IBootConfig:
    """iBoot: a video encoder bootstrapped from a frozen image model. No public code: every default here is
    reconstructed from the paper (§3-4) and BYOL, and marked so in the recipe."""
    teacher: str = "vit2d_base_patch16"  # timm:<name> (DINO, CLIP, MAE …) or a vssl_ds 2D model + weights
    teacher_weights: str = ""
    teacher_pool: str = "cls"  # cls | mean: the teacher's global embedding of a frame
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    symmetric: bool = True  # both clips predict the other clip's teacher embedding
    target: str = "pooled"  # (r) pooled: the other clip's frame embeddings averaged | frames: one target per frame
    targets: str = "online"  # online: the image model runs in the step | cache: frame embeddings from data.targets


@dataclass
class MethodConfig:
    name: str = "mae"
    mae: MAEConfig = field(default_factory=MAEConfig)
    mvd: MVDConfig = field(default_factory=MVDConfig)
    bevt: BEVTConfig = field(default_factory=BEVTConfig)
    lstcl: LSTCLConfig = field(default_factory=LSTCLConfig)
    vicmae: ViCMAEConfig = field(default_factory=ViCMAEConfig)
    iboot: IBootConfig = field(default_factory=IBootConfig)


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # base lr; lr = blr * global_batch / 256 unless `lr` is set (global batch in videos:
    # batch_size / repeats x ranks x grad_accum, as VideoMAE counts it)
    lr: float = 0.0  # absolute lr (overrides blr scaling when > 0)
    min_blr: float = 0.0  # final lr of the cosine, scaled like blr
    min_lr: float = 0.0  # absolute final lr (overrides min_blr when > 0)
    warmup_blr: float = 0.0  # lr the warmup starts from, scaled like blr (VideoMAE / MVD: warmup_lr 1e-6)
    warmup_epochs: float = 40.0
    warmup_steps: int = 0  # > 0 overrides warmup_epochs
    weight_decay: float = 0.05
    weight_decay_end: float = -1.0  # cosine weight-decay schedule end value; < 0 = constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float = 0.0  # global grad-norm clip; 0 = off


@dataclass
class EngineConfig:
    zero_stage: int = 1
    precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | bf16 | fp16 | fp32
    grad_accum: int = 1
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme (ZeRO-3 only)
    nvme_path: str = "/local_nvme"
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    ds_config: str = ""  # optional DeepSpeed JSON merged under the generated one (for expert keys)


@dataclass
class EvalConfig:
    """Downstream evaluation (vssl_ds/eval): fine-tuning, linear / attentive probes, kNN. Defaults follow
    VideoMAE's fine-tuning recipe (ViT-B, Kinetics-400) and DINO's kNN."""
    weights: str = ""  # encoder from tools/export.py (.safetensors, its .json beside it); "" = random init
    num_classes: int = 0  # 0: the number of classes in data.train's manifest
    val: str = ""  # labelled test shards (manifest, brace pattern or URLs); "" = no test pass
    pool: str = "auto"  # auto (CLS if the encoder has one, else mean of tokens) | mean | cls
    layer_decay: float = 0.75  # fine-tuning: lr of block i scaled by decay^(depth + 1 - i)
    head_dropout: float = 0.0
    head_init_scale: float = 0.001  # fine-tuning head weights: trunc_normal(0.02) times this
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(α, α) for mixup; 0 = off
    cutmix: float = 1.0  # Beta(α, α) for cutmix (the same box on every frame); 0 = off
    mix_prob: float = 1.0  # probability a batch is mixed at all
    switch_prob: float = 0.5  # probability to use cutmix when both are on
    probe_heads: int = 16  # attentive probe: heads of its cross-attention (width must divide)
    test_clips: int = 5  # multi-clip testing: clips spread evenly over each video
    test_crops: int = 3  # multi-crop testing: short side to data.size, crops along the long side
    test_batch_size: int = 4  # videos per device in the test pass (each with clips x crops views)
    knn_k: int = 20
    knn_t: float = 0.07
    knn_train_views: int = 1  # views (clips x 1 centre crop) averaged per training video for kNN


@dataclass
class MonitorConfig:
    every: int = 500  # optimizer steps between health probes of the encoder (0 = off); see vssl_ds/monitor.py
    clips: int = 64  # probe clips over all ranks (the first clips each rank trains on, kept for the whole run)
    val: str = ""  # labelled shards: leave-one-out kNN top-1 of the frozen features at every probe (monitor/knn_top1)
    knn_k: int = 10  # neighbours voting in that probe (its labelled sets hold tens of clips per class)
    knn_standardize: bool = True  # standardise each feature dimension over the probe clips first (MAE's probe BN)
    images: int = 4  # masked-pixel methods: probe clips shown as original / masked / reconstruction (0 = none)
    collapse_drop: float = 0.5  # collapse alarm: RankMe or feature std below this x the best the run has reached


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# choices that a type alone cannot express; checked before any work starts
CHOICES = {
    "data.short_video": ("loop", "pad", "skip"),
    "run.wandb_mode": ("", "online", "offline", "disabled"),
    "data.decoder": ("decord", "pyav", "torchcodec"),
    "data.decode_device": ("cpu", "cuda"),
    "data.synthetic_task": ("shape", "silhouette", "orbit", "drift"),  # vssl_ds.data.synthetic.TASKS
    "data.view": ("clip", "scale_crop", "long_short", "frame_pair", "finetune", "image"),
    "model.attn_backend": ("auto", "xformers", "sdpa", "math"),
    "model.swin_index": ("official", "window"),
    "model.swin_image_path": ("auto", "official", "video"),
    "method.name": ("mae", "mvd", "bevt", "lstcl", "vicmae", "iboot", "finetune", "linear", "attentive", "knn"),
    "eval.pool": ("auto", "mean", "cls"),
    "method.iboot.teacher_pool": ("cls", "mean"),
    "method.iboot.targets": ("online", "cache"),
    "method.iboot.target": ("pooled", "frames"),
    "method.lstcl.framework": ("mocov3", "byol", "simsiam"),
    "method.bevt.tokenizer": ("dalle", "kmeans"),
    "method.bevt.targets": ("online", "cache"),
    "method.mvd.mask": ("tube", "random"),
    "method.mvd.loss": ("smooth_l1", "l2", "l1"),
    "method.mvd.targets": ("online", "cache"),
    "model.pos_embed": ("sincos", "sincos2d", "sincos3d", "learned"),
    "method.mae.mask": ("tube", "random", "block_tube"),
    "engine.zero_stage": (0, 1, 2, 3),
    "engine.precision": ("auto", "bf16", "fp16", "fp32"),
    "engine.offload_optimizer": ("none", "cpu", "nvme"),
    "engine.offload_param": ("none", "cpu", "nvme"),
    "engine.backend": ("auto", "nccl", "gloo"),
}
