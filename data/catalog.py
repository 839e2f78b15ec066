"""What the supported scene datasets look like when published, and where to download them.

Kept as plain data in one place so that `data/prepare.py` (download and check) and the
tests (which point the URLs at a local server) read the same tables.
"""

# ---------------------------------------------------------------------------
# Class names. Sources (read, not imported: torchgeo is not a dependency):
#   torchgeo 0.8.1 (PyPI wheel torchgeo-0.8.1-py3-none-any.whl)
#     UC Merced:      torchgeo/datasets/ucmerced.py, class list in the UCMerced docstring
#     NWPU-RESISC45:  torchgeo/datasets/resisc45.py, class list in the RESISC45 docstring
#     EuroSAT:        torchgeo/datasets/copernicus/eurosat_s2.py, CopernicusBenchEuroSATS2.classes
#                     (the folder names of the release; eurosat.py only lists display names)
# ---------------------------------------------------------------------------

UCMERCED_CLASSES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)

NWPU_CLASSES = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge",
    "chaparral", "church", "circular_farmland", "cloud", "commercial_area",
    "dense_residential", "desert", "forest", "freeway", "golf_course", "ground_track_field",
    "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
    "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway",
    "sea_ice", "ship", "snowberg", "sparse_residential", "stadium", "storage_tank",
    "tennis_court", "terrace", "thermal_power_station", "wetland",
)

# Per-class image counts of EuroSAT as published by Helber et al., "EuroSAT: A Novel Dataset
# and Deep Learning Benchmark for Land Use and Land Cover Classification", IEEE JSTARS 2019
# (2,000 to 3,000 images per class, 27,000 in all). The RGB and the 13-band release have the
# same files, as .jpg and .tif.
EUROSAT_COUNTS = {
    "AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000, "Highway": 2500,
    "Industrial": 2500, "Pasture": 2000, "PermanentCrop": 2500, "Residential": 3000,
    "River": 2500, "SeaLake": 3000,
}

# ---------------------------------------------------------------------------
# Published layout of each dataset.
#   name:     the folder under the data root (= the training flag --dataset)
#   ext:      image extension (= --imgEXT)
#   classes:  {class folder: number of images}, or None where we know only the counts below
#   size:     (width, height) of every image, or None where the release is not uniform
# ---------------------------------------------------------------------------
DATASETS = {
    "ucmerced": {
        "title": "UC Merced Land Use",
        "name": "UCMerced",
        "ext": "tif",
        "classes": {c: 100 for c in UCMERCED_CLASSES},
        # Published as 256x256, but a few dozen images of the release are a few pixels
        # smaller, so the size is not checked.
        "size": None,
    },
    "eurosat": {
        "title": "EuroSAT (RGB)",
        "name": "EuroSAT",
        "ext": "jpg",
        "classes": dict(EUROSAT_COUNTS),
        "size": (64, 64),
    },
    "eurosat-ms": {
        "title": "EuroSAT (13-band multispectral)",
        "name": "EuroSAT_MS",
        "ext": "tif",
        "bands": 13,
        "classes": dict(EUROSAT_COUNTS),
        "size": (64, 64),
    },
    "aid": {
        "title": "AID",
        "name": "AID",
        "ext": "jpg",
        # No loader source with AID's class names was available to us (torchgeo has none),
        # so only the published counts are checked: Xia et al., "AID: A Benchmark Data Set
        # for Performance Evaluation of Aerial Scene Classification", IEEE TGRS 2017.
        "classes": None,
        "num_classes": 30,
        "total": 10000,
        "per_class": (220, 420),
        "size": (600, 600),
    },
    "nwpu": {
        "title": "NWPU-RESISC45",
        "name": "NWPU-RESISC45",
        "ext": "jpg",
        "classes": {c: 700 for c in NWPU_CLASSES},
        "size": (256, 256),
    },
}

# ---------------------------------------------------------------------------
# Official archives. `inner` is the folder inside the archive that holds the class folders.
# ---------------------------------------------------------------------------
DOWNLOADS = {
    # torchgeo 0.8.1, torchgeo/datasets/ucmerced.py: UCMerced.url + UCMerced.filename,
    # UCMerced.md5, UCMerced.base_dir
    "ucmerced": {
        "url": "https://hf.co/datasets/torchgeo/ucmerced/resolve/"
               "7c5ef3454d9b1cccfa7ccde0c01fc8f00a45909a/UCMerced_LandUse.zip",
        "md5": "5b7ec56793786b6dc8a908e8854ac0e4",
        "filename": "UCMerced_LandUse.zip",
        "inner": "UCMerced_LandUse/Images",
    },
    # torchvision 0.29.1, torchvision/datasets/eurosat.py: EuroSAT.download() URL and md5;
    # the images are in 2750/<class>/ (EuroSAT._data_folder)
    "eurosat": {
        "url": "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
               "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
        "md5": "c8fa014336c82ac7804f0398fcb19387",
        "filename": "EuroSAT.zip",
        "inner": "2750",
    },
    # torchgeo 0.8.1, torchgeo/datasets/eurosat.py: EuroSAT.url + EuroSAT.filename,
    # EuroSAT.md5, EuroSAT.base_dir
    "eurosat-ms": {
        "url": "https://hf.co/datasets/torchgeo/eurosat/resolve/"
               "1ce6f1bfb56db63fd91b6ecc466ea67f2509774c/EuroSATallBands.zip",
        "md5": "5ac12b3b2557aa56e1826e981e8e200e",
        "filename": "EuroSATallBands.zip",
        "inner": "ds/images/remote_sensing/otherDatasets/sentinel_2/tif",
    },
}
