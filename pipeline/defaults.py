"""Every default that the Python API and the ``pipe`` commands share, stated once.

The library's functions and estimators take their defaults from here and the command line
takes them from the library, so ``pipe extract`` and :func:`pipeline.extract` (and so on)
cannot drift apart. Plain values only: this module imports nothing, so the command line's
``--help`` and ``import pipeline`` stay fast.
"""

# where each stage writes (and the next one reads) by default
FEATURES = "cache/features.h5"
HEAD = "cache/head.pt"
METRICS = "cache/metrics.json"
REPORT = "cache/report.html"

# extraction
MODEL = "efficientnet_lite0"
WEIGHTS = "DEFAULT"
FEATURE_DTYPE = "float16"
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train, val, test, for a folder without given splits
CHECKPOINT_EVERY = 1024
LABEL_SEP = "|"
PRECISION = "auto"  # of the model: bfloat16 where the device has it natively, else float32 (pipeline.forward)

# heads: the trainers train-head knows (pipeline.heads.make_estimator's names) and their defaults
HEAD_KIND = "linear"
HEAD_KINDS = ("linear", "sklearn", "knn")
SELECTION = "auto"
MAX_ITER = {"linear": 100, "sklearn": 1000}  # L-BFGS iterations per fit, by trainer
TOL = 1e-4  # largest gradient entry at convergence (scikit-learn's rule)
MAX_EPOCHS = 30  # mini-batch path
LEARNING_RATE = 1e-2  # mini-batch path (Adam)
KNN_KS = (10, 20, 50, 100)
KNN_TEMPERATURE = 0.07  # DINOv2's

# using a head
SPLIT = "test"
TOPK = 3
PREDICT_BATCH_SIZE = 32
DEVICE = "auto"
SEED = 0
