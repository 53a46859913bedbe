"""Every default of the project, in one commented table.

TrainParams, HpoConfig and SearchSpace, the bin/ argparse defaults and workflow.py read
their defaults from here, so a default lives in one place. The workflow deliberately
overrides a few for the small budget of `make run` (WORKFLOW_OVERRIDES, at the end). The
values that live elsewhere, and why, are listed at the end too.
"""

# -- reproducibility ---------------------------------------------------------------------
SEED = 42                      # one seed fixes the split, augmentation, the search and training

# -- data --------------------------------------------------------------------------------
SAMPLE_IMAGES = 200            # synthetic images of bin/make_sample_data.py; a 70/10/20 split leaves 20 for val
SAMPLE_IMAGE_SIZE = (320, 240) # width, height of a synthetic image: small, so CPU training stays quick
SAMPLE_FACES = (1, 6)          # fewest and most faces per synthetic image (the real photos hold one to a crowd)
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test, stratified on the rare class
VOC_CLIP_TOLERANCE_PX = 2.0    # a box overshooting its image by at most this many pixels is clipped (annotation
                               # tools commonly round outwards); beyond it the object is dropped and reported
NEAR_DUPLICATE_DISTANCE = 4    # pHash Hamming distance (of 64 bits) under which images count as near duplicates
VALIDATE_WORKERS = 0           # decoding threads of validation; 0: min(8, CPUs) (PIL and hashing release the GIL)
VALIDATE_WORKERS_MAX = 8       # ... that 8; also the threads scan_pairs decodes a labelled set on (train, evaluate)
JPEG_QUALITY = 95              # quality of every JPEG the data jobs write
PNG_COMPRESS_LEVEL = 1         # zlib level of every PNG they write: a 12 MP photo in 0.67 s and 12.0 MB, against
                               # 2.89 s and 9.7 MB at Pillow's default 6 (measured on 2026-12-06, 2 CPU cores)
PREPROCESS_FORMAT = "source"   # source | jpg | png. source: a JPEG or PNG photo that needs no resizing goes into the
                               # val or test set byte for byte, any other as lossless PNG, so those sets decode to the
                               # very pixels predict reads from the photos: the working size, threshold and rates are
                               # chosen, and the test figures measured, on what predict sees. The JPEG (quality 95)
                               # second generation used before moved the 60-minute model's test figures (pacc2 error
                               # -4.9 against -3.7 points on the photos' own pixels; bench/RESULTS.md, "The val and
                               # test sets in the photos' own pixels"); jpg and png re-encode every image
PREPROCESS_MAX_SIZE = None     # longest side after preprocessing; None keeps the original size (predict reads the
                               # photos at their own size; the working sizes tried go up to INFERENCE_SIZE_MAX)
AUGMENT_COPIES = 2             # augmented copies per training image
RARE_FACTOR = 2                # extra copies of each image holding mask_weared_incorrect (~3 % of real faces)
NOISE_STD = 8.0                # Gaussian pixel noise of an augmented copy, in 8-bit units (0-255)
AUGMENT_FLIP = 0.5             # probabilities of each step of an augmented copy (augment.build_transform, which
AUGMENT_ZOOM_OUT = 0.3         # holds the steps' own ranges): horizontal flip, zoom out onto a grey canvas,
AUGMENT_CROP = 0.4             # IoU-constrained crop, colour jitter
AUGMENT_COLOUR = 0.8
AUGMENT_ATTEMPTS = 5           # draws of a copy that lost every box before it is left out (and listed in the report)
SHARD_DATA_ABOVE = 2000        # workflow: above this many images the splits travel as .tar shards (one replica
                               # per shard, not two per image); at or below, every file is its own replica
DATA_SHARD_IMAGES = 1000       # images per shard of a sharded data set (bin/make_shards.py --shard-size too)
SHARD_WORKERS = 4              # shards written, or verified, at once (bin/make_shards.py --workers): each a thread
                               # that reads and hashes files, so a few keep a disk busy without holding the GIL
LABEL_MAP = ""                 # --label-map SOURCE=CLASS,...: other data sets' object names -> our classes;
                               # "" maps none
FOLDS = 0                      # workflow --folds K: K-fold cross-validation on the train+val pool (K train +
                               # evaluate jobs, group-aware and stratified like the split); 0: none

# -- model -------------------------------------------------------------------------------
BACKBONE = "retinaface_mnet025"  # face-pretrained first stage (WIDER FACE RetinaFace as backbone + RPN): in the
                               # same 15 CPU minutes on the real data it beat mobilenet_v2_fpn (ImageNet) on every
                               # figure at 4-8x its training speed (bench/RESULTS.md); without its provisioned
                               # weights it falls back to mobilenet_v2_fpn with ImageNet weights and says so
WEIGHTS = "imagenet"           # none | imagenet | coco | widerface | a file; imagenet means the backbone's own
                               # pretrained weights (WIDER FACE for retinaface_mnet025); falls back and says so
IMAGE_SIZE = 512               # longest image side the detector works at (faces are often under 30 px)
TRAINABLE_LAYERS = 3           # backbone stages trained, counted from the top
# The detector's sizes of mobilenet_v2_fpn and retinaface_mnet025 (model.py builds those two itself; torchvision's
# builders of the other backbones keep torchvision's own: 100 detections, 1000 proposals after NMS, 512 RoIs):
DETECTIONS_PER_IMAGE = 1000    # most boxes one image reports, best scores first, those down to DETECTION_FLOOR
                               # included (a face can give a box per class and pass). At 200 it cut boxes above
                               # the floor from 3 of the real test split's 134 photos (the 115-face crowd's up to
                               # score 0.14), which the score-sum estimators and the recall lost (bench/RESULTS.md,
                               # "The detections-per-image cap"). RPN_POST_NMS_TOP_N_TEST
                               # bounds the proposals, so the cap only guards against a pathological photo.
                               # This and the two below reach new models only: a model file records its own and uses
                               # them (model_file.postprocessing), as its threshold and rates were measured
RPN_PRE_NMS_TOP_N_TEST = 1000  # proposals per pyramid level kept before the RPN's NMS at inference (torchvision's)
RPN_POST_NMS_TOP_N_TEST = 500  # ... and per image after it (torchvision's 1000): ~4 a face of the most crowded photo
OWN_ROI_BATCH_SIZE = 256       # "the architecture's own" proposals per image of ROI_BATCH_SIZE=None (torchvision's 512)
WEIGHTS_DOWNLOAD_TIMEOUT_S = 20  # a download of torchvision weights gives up after this: offline machines fail fast

# -- training ----------------------------------------------------------------------------
EPOCHS = 10
BATCH_SIZE = 4
LOADER_WORKERS = -1            # -1: none on a CPU (decoding is <1 % of a step), a few on a GPU: half the CPUs,
LOADER_WORKERS_GPU_MAX = 4     # 1 to this many
OPTIMIZER = "sgd"              # sgd | adamw
LR = 0.01
MOMENTUM = 0.9                 # SGD momentum, AdamW beta1
WEIGHT_DECAY = 1e-4
LR_SCHEDULE = "cosine"         # cosine | step, after a linear warm-up
WARMUP_ITERS = 100
LR_WARMUP_START_FACTOR = 0.001 # the warm-up rises linearly from LR x this to LR
LR_COSINE_MIN_FACTOR = 0.01    # cosine: ends at LR x this, not 0
LR_STEP_MILESTONES = (0.67, 0.89)  # step: the rate drops at these fractions of the iterations ...
LR_STEP_GAMMA = 0.1            # ... each time by this factor
CLIP_GRAD = 10.0               # gradient-norm clipping; 0 turns it off
FREEZE_BACKBONE_EPOCHS = 0     # epochs with the whole backbone frozen before TRAINABLE_LAYERS apply
HFLIP = 0.5                    # probability of a horizontal flip per training image
# The recipe's levers; bench/quality.py --ablation measured each in a 15-minute CPU budget on the real data
# (docs/recipe-history.md, "The recipe ablation") and kept those that raised the validation F1.
PHOTOMETRIC = 0.0              # probability of torchvision's RandomPhotometricDistort per training image; off:
                               # it lowered the validation F1 at 15 minutes with the ImageNet backbone (0.661 ->
                               # 0.580) and at 25 minutes with the face-pretrained one (0.780 -> 0.715,
                               # bench/RESULTS.md "Photometric distortion on the face-pretrained recipe")
MULTISCALE = 0.5               # multi-scale training: longer sides IMAGE_SIZE*(1 +- this) in MULTISCALE_STEPs; 0 off.
                               # Rejected at 15 minutes (2-3 epochs); at 60 minutes on the real data it stopped the
                               # over-fitting of the later epochs (val fitness 0.396 at the end, not 0.352) and
                               # raised test mAP@0.5 0.688 -> 0.809 (bench/RESULTS.md, "Multi-scale training")
MULTISCALE_STEP = 32           # px between the multi-scale sizes: torchvision's transform pads a batch to 32s anyway
REPEAT_THRESHOLD = 0.3         # repeat-factor sampling (LVIS): images of classes in fewer than this fraction of
                               # the images are repeated sqrt(t/f) times per epoch (mask_weared_incorrect: 11 % of
                               # the real images, so ~1.6x); raised the validation F1 0.606 -> 0.661; 0 off
ROI_BATCH_SIZE = 128           # region proposals sampled per image for the box head's loss (torchvision's
                               # box_batch_size_per_image, a quarter of them faces at most); None: the
                               # architecture's own (256 for mobilenet_v2_fpn, 512 for torchvision's builders).
                               # 128 made a CPU step ~25 % cheaper and raised the validation F1 0.661 -> 0.677
                               # in the same 15 minutes; a GPU run keeps the architecture's own unless given
BOX_LOSS = "smooth_l1"         # the box head's regression loss: smooth_l1 (torchvision's, on the encoded offsets) or
                               # giou (the generalised IoU of the decoded boxes); recipe.set_box_head_training
GIOU_LOSS_WEIGHT = 10.0        # BOX_LOSS=giou: the loss is this x (1 - GIoU), mmdetection's weight for Faster R-CNN:
                               # 1.2-2.8x torchvision's smooth L1 of the same offsets
ROI_FG_IOU = 0.5               # IoU with a face from which a sampled proposal trains the box head as that face, and
                               # below which (or below ROI_BG_IOU) as background (torchvision's 0.5; Cascade R-CNN's
                               # later stages 0.6-0.7)
ROI_BG_IOU = None              # IoU below which a sampled proposal trains the box head as background; those between it
                               # and ROI_FG_IOU are left out of the loss (an ignore band). None: ROI_FG_IOU, no band
EMA_DECAY = 0.0                # exponential moving average of the weights (validation and the model file); 0 off
                               # (0.998 at 12 minutes and 0.999 at 60 lowered the validation figures; bench/RESULTS.md)
EMA_RAMP_UPDATES = 100         # the EMA's decay ramps up as decay * (1 - exp(-updates / this)), as Ultralytics' does,
                               # but over 100 updates, not 2000: a CPU run here makes about 1,000 updates in all
TIME_BUDGET = None             # minutes of training (validation included); epochs are fitted to it. None: EPOCHS
AMP = True                     # mixed precision on CUDA (never on a CPU)
STAGES = None                  # --stages: staged training, e.g. [{epochs: 3, lr: 0.02, trainable_layers: 0},
                               # {epochs: 10, lr: 0.005, trainable_layers: 5}]; each stage a fresh warm-up +
                               # cosine and a new optimizer (utils/detection/stages.py). None: one stage of EPOCHS
TENSORBOARD_DIR = None         # --tensorboard-dir of train and hpo; None writes no events (a hand run stays clean)
TENSORBOARD_EVERY = 10         # train: the step losses and lr are written as means over this many steps
TENSORBOARD_IMAGES = 4         # train: validation images with predicted boxes written each epoch (at most this)
KEEP_WEIGHTS = "last"          # train: the weights the model file keeps: last, or best (the epoch of the highest
                               # validation fitness, as Ultralytics' best.pt). On the real data best won at the
                               # training size but tied once the working size and TTA were chosen (bench/RESULTS.md)
VAL_MODE = "monitor"           # monitor: val held out, logged every epoch and used to choose the score threshold;
                               # merge: train on train+val (no held-out images: the threshold stays the default)

# -- hyper-parameter search (Optuna) -----------------------------------------------------
HPO_EPOCHS = 3                 # epochs per trial
HPO_TRIALS = 10                # finished trials one worker's study should hold
HPO_JOBS = 2                   # parallel HPO jobs (K) of the workflow, each one worker of the search
HPO_NUM_WORKERS = 1            # K workers share the lr range; by hand one searches it all (the workflow passes its K)
HPO_WARMUP_ITERS = 50
HPO_OBJECTIVE = "fitness"      # fitness = 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95 (Ultralytics), or map
HPO_OBJECTIVES = {             # the choices (bin/hpo.py --objective) and what each scores:
    "fitness": "0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95 on the validation set (eval mode)",
    "map": "COCO mAP@0.5:0.95 on the validation set (eval mode)",
}
HPO_LR_RANGE = (1e-3, 5e-2)    # log scale; K workers search K disjoint slices of it
HPO_MOMENTUM_RANGE = (0.8, 0.95)
HPO_WEIGHT_DECAY_RANGE = (1e-5, 1e-3)  # log scale
HPO_TRAINABLE_LAYERS_RANGE = (1, 5)
HPO_BATCH_SIZES = (4,)         # one value: not searched
HPO_PRUNER_STARTUP_TRIALS = 2  # completed trials before the MedianPruner prunes
HPO_PRUNER_WARMUP_EPOCHS = 0
HPO_TPE_STARTUP_TRIALS = 5     # random trials before TPE models the search's results
HPO_DEFAULT_TRIAL = True       # the worker whose lr slice holds LR runs the training defaults (LR, MOMENTUM,
                               # WEIGHT_DECAY, TRAINABLE_LAYERS) as its first trial, so the search never picks
                               # parameters that scored below them on validation. With one random trial per worker
                               # (the workflow's budget) it once picked lr 0.0024 over a diverged 0.047 (#21)
HPO_MAX_REQUEUES = 2           # an interrupted trial is enqueued again at most this often: one that keeps killing
                               # its job is not retried for ever

# -- inference, evaluation and prediction -------------------------------------------------
PREDICT_IMAGES_PER_JOB = 1000 # workflow: images per predict job (shard), ~20 min on 2 CPU cores, ~1 min on a GPU
                              # (plain passes at 512 px; a model that chose 768 px and flip TTA takes ~4.5 times)
VIDEO_STRIDE = 5               # predict_video / workflow --pred-videos: every 5th frame (5 a second at 25 fps)
VIDEO_PLOT_MAX_POINTS = 2000   # compliance_over_time.png draws longer runs as this many means of consecutive frames:
                               # a bar a frame took ~10 kB and ~2.4 ms each (a day at stride 5: 4 GB, 17 min)
ANNOTATE_MAX = 500             # workflow: annotated images drawn over the whole prediction set, spread evenly
ANNOTATED_MAX_SIDE = 1280      # predict's annotated copies (and --explain's maps and crops) are drawn on a copy of the
                               # photo at most this long a side (never above its own): decoded whole, each of the 64
                               # photos the decode workers hold ready held 36 MB at 12 MP
PREDICT_CHECKPOINT_EVERY = 100 # predict saves its checkpoint every this many images: what a kill with no time to
                               # save (SIGKILL) loses at most, against a pack per save
ANNOTATED_JPEG_QUALITY = 90    # JPEG quality of predict's annotated copies and --explain overlays (the service's:
                               # SERVICE_ANNOTATED_JPEG_QUALITY)
FOLDER_PLOT_MAX = 40           # compliance_by_folder.png draws the folders with the most images, at most this many:
                               # a row each made 3000 folders a 125,000-px-tall figure drawn in 1.4 GB
INFERENCE_SCALES = (1.0, 1.25, 1.5, 1.75, 2.0)  # working sizes tried after training, times --image-size: the
                               # model runs at the one that scores best on the validation images (issue #21:
                               # faces are small: the 60-minute 512 px model's validation mAP@0.5 went from
                               # 0.555 at 512 px to 0.643 at 800 px). Cost per image grows with the size squared
INFERENCE_SIZE_MAX = 1280      # the largest working size tried (CPU cost; the photos are mostly 400 px wide)
INFERENCE_SIZE_TOLERANCE = 0.005  # fitness within this of the best: the smallest such size is kept (speed)
SCORE_THRESHOLD = 0.5          # operating point: detections at or above it count as faces
THRESHOLD_CANDIDATES = tuple(round(0.05 * step, 2) for step in range(1, 20))  # 0.05, 0.10, ..., 0.95: the operating
                               # points tried on the validation images after training
THRESHOLD_F1_TOLERANCE = 0.01  # ... those within this of the best F1 count as equally good detectors
MATCH_IOU = 0.5                # a detection is that face when their IoU is at least this: the F1 of the threshold
                               # choice, evaluate's confusion matrix and quantify's calibration rates
INTERVAL_CONFIDENCE = 0.95     # confidence of the compliance figure's bootstrap interval; the outputs' labels write
                               # "95 %" themselves (evaluate's text, the headline, the plots, the report): change
                               # them with it
DETECTION_FLOOR = 0.05         # lowest score kept for the probabilistic counts and the service's boxes: torchvision's
                               # own box_score_thresh, below which Faster R-CNN emits no box anyway
COMPLIANCE_ESTIMATOR = "pacc2"  # the headline percent properly masked (utils/detection/quantify.py): cc | pcc | acc
                               # | pacc | pacc2. pacc2 had the smallest mean |error| over the held-out folds of 3-fold
                               # runs on three splits of the real data (bench/RESULTS.md, "Pooling the unmasked
                               # classes"), with intervals half as wide as pacc's; without the model's validation
                               # rates it falls back to cc
CALIBRATION_MIN_FACES = 100    # labelled validation faces an adjusted headline (acc, pacc*) needs, else cc stands in
                               # (and says why): the make run sample's 40 put pacc 22 points off; the real data's
                               # val split has 387, each fold model of a 3-fold run 223-300
BOOTSTRAP_REPLICATES = 1000    # resamples behind each 95 % interval of the compliance figure (seeded with SEED)
VIDEO_ASSUMED_FPS = 25.0       # a video whose source gives no usable frame rate (0, NaN, VIDEO_FPS_MAX or more) is
                               # timed at this many frames a second, as its summary says
VIDEO_FPS_MAX = 1000           # ... a rate a source reports at or above this is not believed
VIDEO_BLOCK_SECONDS = 10.0     # a video's interval resamples blocks of this much consecutive video: nearby
                               # frames show the same faces, so single frames are not independent samples
VIDEO_HOLD_MAX_SECONDS = 5.0   # a live source's annotated video holds a frame until the next one's clock time
                               # (real speed), but at most this long: a stalled stream's hour would be 90,000
                               # copies of one frame, minutes of encoding before a stop, gigabytes at 1080p
VIDEO_WRITER_MIN_FPS = 0.1     # an annotated video slower than this (a large --stride, a container's 0.01 fps) holds
                               # each frame in copies up to it: OpenCV's writer rounds the rate to 1/1000 and
                               # refuses 0.001 fps or less (the run failed after its first frame)
VIDEO_WRITER_MAX_COPIES = 120  # ... but in at most this many copies (20 min at 0.1 fps), slower videos playing faster:
                               # a file saying 0.0001 fps took 1000 copies of each frame (21 s and 177 MB at 1080p),
                               # one saying 1e-300 wrote without end
WBF_IOU = 0.55                 # predict --model A B ... and --tta: boxes of several models (or of the plain and
                               # the flipped pass) overlapping more than this are one face, fused by weighted
                               # box fusion (ensemble-boxes' default)
BOX_VOTE_IOU = 0.7             # box voting (inference.VotingRoIHeads), when chosen on validation: a kept box moves to
                               # the score-weighted mean of its class's boxes overlapping it this much before NMS. On
                               # the real data's validation images 0.6, 0.7 and 0.8 gave mAP 0.423, 0.430, 0.430 (none
                               # 0.418) and mAR@100 0.566, 0.578, 0.573 (none 0.565)
EXPLAIN_METHOD = "hirescam"    # --explain: hirescam (per box, stays on the evidence the box used) | gradcam | eigencam
EXPLAIN_METHODS = ("hirescam", "gradcam", "eigencam")  # the choices (predict --explain-method, the service)
EXPLAIN_MAX_BOXES = 5          # --explain: highest-scoring boxes explained per image (a backward pass each)
EXPLAIN_MAP_MAX_SIDE = 1024    # an explanation's heat map is kept at most this long a side (or the model's frame's):
                               # its detail is the working size's; at a 12 MP photo's own size each box's
                               # maps (3 under flip TTA) held 48 MB apiece, ~720 MB for 5 boxes
EXPLAIN_CROP_CONTEXT = 1.0     # --explain's crops: context around a box on each side, in box sizes (a face with
                               # its surroundings)
EXPLAIN_CROP_MIN_SIDE = 64     # ... and pixels of the photo a crop covers at least (tiny faces)
EXPLAIN_OVERLAY_SIDE = 256     # longest side of a written overlay
EXPLAIN_HEATMAP_WEIGHT = 0.5   # share of the heat map in an overlay's blend (grad-cam's show_cam_on_image
                               # image_weight is 1 - this)
INFERENCE_BATCH_SIZE = 4       # images per model call
DECODE_WORKERS = -1            # image-decoding processes; -1 picks a share of the CPUs: half, 1 to DECODE_WORKERS_MAX
DECODE_WORKERS_MAX = 4         # ... at most this many: the rest of the cores run the model's own threads
DECODE_PREFETCH_BATCHES = 4    # batches each decoding worker holds ready ahead of the model (DataLoader's
                               # prefetch_factor): 4 workers x 4 batches x INFERENCE_BATCH_SIZE = 64 photos
DEVICE = "auto"                # auto | cpu | cuda

# -- limits on untrusted input (issue #23: a hardened edge) -------------------------------
IMAGE_MAX_PIXELS = 64_000_000  # width x height read from an image's header before decoding: above it the file is
                               # refused, never decoded (a 12 KB PNG can claim 10000x10000 and take GBs to decode);
                               # 64 M is above any phone or camera photo (48 MP is 8000x6000)
MODEL_IMAGE_SIZE_MAX = 4096    # a model file's image size above this is refused: the detector's working size, so a
                               # file claiming more would make every image cost far more memory than training did
POSTPROCESSING_COUNT_MAX = 10_000  # a model file's proposals or detections per image above this are refused: a file
                               # claiming millions would make one photo's NMS and records swell (1,000 at most today)
YAML_MAX_NODES = 10_000        # values a user's YAML (experiment, sites, stages, settings) may hold once its
                               # aliases are expanded: a few hundred in practice; an alias bomb claims billions
YAML_MAX_CHARS = 1_000_000     # characters of text (every scalar's length, keys too) the same YAML may hold once
                               # its aliases are expanded: a few KB in practice; one 100 KB string aliased 9000
                               # times is 9000 values but a gigabyte to copy, dump or quote
YAML_MAX_FLOW_DEPTH = 100      # brackets nested deeper than this in that YAML are refused as they are scanned:
                               # PyYAML's scanner does work in proportion to the depth for every token, so 5000 "["
                               # cost 3 s and a file of them hours, and its composer recurses once per level
                               # (Python's stack ends near 1000)
MESSAGE_VALUE_CHARS = 80       # an error message shows at most this much of a value it quotes
REPORT_FIGURE_MAX_BYTES = 50 * 2**20  # a figure or annotated image bin/report.py embeds: a larger file is left out
                                      # (a note on the page) before it is read; the jobs' figures are a few 100 KB
REPORT_DATA_MAX_BYTES = 256 * 2**20  # a JSON, CSV or YAML file bin/report.py and compare_runs read: a larger one
                                     # is left out with a problem line (the jobs write a few MB at 100k photos;
                                     # json.load of a GB file takes ~10 GB of memory)

# -- the prediction service (bin/serve.py, utils/service/; docs/service.md) ----------------
SERVICE_HOST = "127.0.0.1"           # bin/serve.py --host: this machine only; 0.0.0.0 exposes it (set --token then)
SERVICE_PORT = 8000                  # bin/serve.py --port
SERVICE_FORWARDED_ALLOW_IPS = "127.0.0.1"  # --forwarded-allow-ips where $FORWARDED_ALLOW_IPS is not set: the loopback
                                           # address --host binds by default, so a reverse proxy on this host (uvicorn
                                           # 0.54's own default also names ::1)
SERVICE_MAX_UPLOAD_MB = 20.0         # largest image file accepted per upload
SERVICE_MAX_IMAGES = 16              # images per request at most
SERVICE_QUEUE_SIZE = 8               # requests admitted at once (decoding, waiting, in inference); one more: 503
SERVICE_MAX_IMAGE_PIXELS = 25_000_000  # width x height of one upload, read from its header before decoding: above
                                     # it 413, never decoded. Below IMAGE_MAX_PIXELS of the jobs because a server
                                     # decodes many at once; 25 M passes a 6000x4000 (24 MP) camera photo
SERVICE_PIXELS_IN_MEMORY = 64_000_000  # decoded pixels all requests together may hold (3 bytes each as uint8):
                                     # a request waits until its images fit; one needing more alone gets 413.
                                     # Peak measured 1.66 GB with one request at it (docs/service.md): < 2 GB
SERVICE_BATCH_SIZE = 4               # images of any requests run in one forward pass at most
SERVICE_BATCH_MAX_PIXELS = 8_000_000 # ... and their pixels together at most (the model input is float: 12 bytes
                                     # a pixel, twice over while normalised); a larger image runs alone
SERVICE_BATCH_WAIT_MS = 5.0          # how long the worker waits for more images to join a batch it has begun
SERVICE_DECODE_THREADS = None        # threads decoding uploads off the event loop; None: one per CPU core
SERVICE_GIL_SWITCH_S = 0.0005       # bin/serve.py: how long a thread may hold the GIL while another waits for it
                                     # (Python's default 0.005): the model's forward pass needs the GIL between its
                                     # ops and waited up to 5 ms each time the event loop parsed a request; 0.5 ms
                                     # served 2-4 % more requests/s at 1 and 16 clients (docs/service.md)
SERVICE_MAX_REQUESTS = 32            # requests received or served at once (probes excepted); more are answered 503
                                     # by the edge. Each may hold up to 1 MB of each of its at most --max-images
                                     # file parts in memory while its body arrives (the multipart parser spools
                                     # the rest to an unnamed temporary file): 32 x 16 x 1 MB. Open connections
                                     # without a request do not count (SERVICE_HEADER_TIMEOUT_S closes them)
SERVICE_CLIENT_SHARE_OF_REQUESTS = 0.25  # the share of SERVICE_MAX_REQUESTS one client address may hold at once
                                     # (--max-requests-per-client defaults to it: 8 of 32); more from it are answered
                                     # 429. One client keeping up the minimum body rate on every slot, reconnecting
                                     # after each cut, kept all of them busy; now it takes four addresses. Behind a
                                     # reverse proxy all requests come from its address: docs/service.md, what to set
SERVICE_HEADER_TIMEOUT_S = 10.0      # a connection must complete a request's line and headers this long after it
                                     # connected or after its previous answer, else it is closed (slowloris)
SERVICE_BODY_TIMEOUT_S = 30.0        # a request body that sends nothing this long is cut off (408)
SERVICE_MIN_BODY_RATE_KBS = 32.0     # ... and one that, after its first SERVICE_BODY_TIMEOUT_S, has come slower than
                                     # this on average (KB/s; a 20 MB photo in 11 minutes): a byte every 29 s kept
                                     # its request slot for as long as the client liked. 0: no minimum rate
SERVICE_BODY_DEADLINE_S = 300.0      # ... and one not complete this long after it began (408): just above the rate,
                                     # the largest body (321 MB) held its slot 2.9 hours. Needs ~1.1 MB/s for that
                                     # body, 70 KB/s for a 20 MB photo. 0: no deadline
SERVICE_SEND_TIMEOUT_S = 30.0        # an answer waiting for its client must be taken within this plus its unsent
                                     # bytes at SERVICE_MIN_BODY_RATE_KBS, else the connection is aborted: a client
                                     # that never read kept its whole answer (tens of MB when annotated) in memory
SERVICE_LINGER_S = 30.0              # an answer given before its request's body was read (401, 413, 429, 503): the
                                     # server reads and drops what the client still sends for at most this long
                                     # before closing (nginx's lingering close): closed at once, the connection was
                                     # reset under a client still sending, which then never read the answer
SERVICE_STOP_TIMEOUT_S = 30.0        # SIGTERM: seconds requests in flight get to finish before they are cut off
                                     # (503) and the model's job then running is abandoned (exit 0 either way)
SERVICE_ANNOTATED_MAX_SIDE = 1280    # ?annotated=true: the drawn picture's longer side at most, in pixels (shrunk
                                     # to it): at full size a request's pictures made an answer of tens of MB,
                                     # held outside the pixel budget while a slow client read it
SERVICE_ANNOTATED_JPEG_QUALITY = 85  # ... and its JPEG quality, /api/explain's overlays' too (they ride in the JSON
                                     # answer as data URLs)
SERVICE_RETRY_AFTER_S = 2            # the Retry-After of a 429 or 503: seconds a client refused as busy is told to wait
SERVICE_EXPLAIN_MATCH_IOU = 0.5      # /api/explain: the box explained is the model's box of that class overlapping the
                                     # one the client sent more than this (a box /api/predict returned overlaps ~1)
SERVICE_REQUEST_OVERHEAD_MB = 1.0    # a request body may exceed max_images x max_upload_mb by this (multipart
                                     # headers, form fields); a larger body is refused before it is read

# -- the workflow (workflow.py) ---------------------------------------------------------------------
GPUS = 0                       # workflow --gpus: GPUs per hpo/train/evaluate/predict(_video) job; 0: CPU only
# Used where sites.yml names none (sites.yml's execution_site and container: win over these):
EXECUTION_SITE = "condorpool"
CONTAINER_TYPE = "singularity"
CONTAINER_IMAGE = "docker://maskdetection/mask-detection-workflow:latest"
LOCAL_JOBS_MAX = 4             # workflow --local without --jobs: min(this, CPUs) jobs at once (experiments/
                               # default.yml leaves --jobs null so that it holds no machine's CPU count)
EXECUTOR_JOBS = 2              # python -m utils.executor RUN_DIR without --jobs
COMPARE_SORT_BY = "map_50"     # bin/compare_runs.py --sort-by: the column the runs are ranked by

# Where the workflow departs from the defaults above on purpose. Most entries size the default run for
# `make run` (120 synthetic images, 2 CPU cores, 9 to 11 minutes); raise them by flag for real data.
WORKFLOW_OVERRIDES = {
    "epochs": 2,          # make run budget (the Makefile passes --time-budget, which replaces it)
    "hpo_epochs": 1,      # make run budget
    "trials": 2,          # make run budget: one trial per HPO job
    "image_size": 256,    # make run budget: the sample's images are 320x240
    "augment_copies": 1,  # make run budget
    "rare_factor": 1,     # make run budget
}

# -- defaults that live elsewhere, and why ----------------------------------------------------------
# utils/detection/params.py   GPU_BACKBONE, GPU_BATCH_SIZE, GPU_IMAGE_SIZE: what the GPU recipe picks on CUDA for every
#                             setting the user left at its default above; they apply only there.
# utils/pegasus/runtimes.py   SECONDS_PER_IMAGE, SAFETY, STARTUP_S, MIN_RUNTIME_S, GRACE_MIN, ...: measured
#                             constants of the job time-limit formula, beside the formula they feed; sites.yml
#                             overrides them per site.
# utils/pegasus/catalogs.py   RESOURCES: cores and memory each job kind asks of a node, beside the job table.
# utils/executor/job_try.py   TERM_GRACE_S: how long the local executor waits after SIGTERM before SIGKILL.
# properties.conf             dagman.retry, pegasus.mode, transfer threads: Pegasus properties, kept in
#                             Pegasus' own file so that pegasus-plan reads them as they are.
# utils/detection/model.py    MOBILENET_V2_RETURN_NODES, MOBILENET_V2_FPN_CHANNELS (128), FACE_ANCHOR_SIZES,
#                             FACE_ASPECT_RATIOS, the RoI pool (7x7, 2 samples): the architectures model.py builds;
#                             a model file records the anchors and its weights fit only them: not settings.
#                             torchvision's own builders (mobilenet_v3_large_fpn, resnet50_fpn*) keep torchvision's
#                             sizes, not DETECTIONS_PER_IMAGE & co. above: 100 detections a photo, 1000 proposals.
# utils/detection/retinaface.py  CHANNELS, STRIDES, ANCHOR_SIZES, BOX_CODER_WEIGHTS, BGR_MEAN, LEAKY: RetinaFace's,
#                             fixed by its pretrained WIDER FACE weights.
# utils/detection/recipe.py   EVAL_STEP_FRACTION (0.4), TimeBudget's timed steps (2 skipped, 10 timed): measured
#                             constants of the --time-budget plan, beside the formula they feed.
# utils/detection/optim.py    AdamW's beta2 (0.999): torch's own; MOMENTUM plays beta1.
# utils/detection/metrics.py  COCO's 100 detections per image and class (mAR@100) and the PR curves at IoU 0.5:
#                             the metrics' definitions, not choices.
# utils/detection/quantify.py BOOTSTRAP_CHUNK_DRAWS: memory of one chunk of bootstrap draws, not a result choice.
# utils/detection/hpo_study.py STALE_LOCK_S: Optuna's own grace period for a journal writer's lock.
# utils/data/augment.py       the steps' own ranges (zoom out 1-1.6x onto ZOOM_OUT_FILL, IoU crop of 0.5-1 scale,
#                             colour jitter 0.3/0.03, boxes under 2 px dropped), beside the pipeline they shape.
# utils/data/sample_data.py   FACE_HEIGHT_PX, MIN_FACE_HEIGHT_PX, SUPERSAMPLE: how a synthetic face is drawn.
# output sizes and safety     compliance.SCORE_DECIMALS (4), cli.SKIPPED_PRINTED and make_fold LISTED (20 names),
#   bounds, beside their use  shards.INDEX_SKIPPED_LISTED (100), figures.FIGURE_LABEL_CHARS (60),
#                             progress_file.FSYNC_EVERY (64), images.CONVERT_BAND_PIXELS, training_plan
#                             .MAX_TIME_BUDGET_MINUTES (a year), params.MIN_ROI_BATCH_SIZE (4), service/metrics
#                             .LATENCY_BUCKETS, uploads.MAX_NAME_CHARS (255): how outputs are written or inputs
#                             bounded, not what the jobs compute.
