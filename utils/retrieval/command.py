"""The retrieval command, `python -m utils.retrieve index | query | evaluate | serve` (its usage is
the docstring of utils/retrieval/parser.py; serve's page and endpoints are in serve.py)."""
import json
import os
import sys

from utils import distributed as dist
from utils.data.scenes import SceneDataset, remove_unreadable
from utils.errors import UserError, exit_on_user_error
from utils.evaluation.encoding import every_metric_by_ties
from utils.evaluation.pictures import retrieval_grid
from utils.retrieval.build import write_index
from utils.retrieval.engine_store import BUILD_FLAGS, attach, engine_params
from utils.retrieval.index_file import check_compatible, check_weights, load_index
from utils.retrieval.network import Loaded, encode_files
from utils.retrieval.outputs import check_index_out, check_writable, existing
from utils.retrieval.parser import ENGINE_FLAGS, build_parser
from utils.retrieval.search import BinaryIndex
from utils.training.flags import REPO_ROOT, image_extension, select_device

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_folder(folder):
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder} does not exist; pass a folder of images with --folder")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise UserError(f"folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def resolve_dataset_flags(args, loaded):
    """--dataset, --data and --imgEXT as given, else as the checkpoint's run had them.

    Returns the names of the settings taken from the checkpoint."""
    run, taken = loaded.flags, []
    if not args.dataset:
        args.dataset = run.get("dataset") or loaded.config.get("dataset")
        if not args.dataset:
            raise UserError(f"checkpoint {loaded.path} does not record its dataset; pass --dataset NAME "
                            f"(or, for index, --folder DIR)")
        taken.append("dataset")
    if not args.imgEXT and run.get("imgEXT") and args.dataset == run.get("dataset"):
        args.imgEXT = run["imgEXT"]  # the extension belongs to the run's dataset, not to another one
        taken.append("imgEXT")
    if run.get("split_file") and args.dataset == run.get("dataset"):
        args.split_file = run["split_file"]  # the run's own splits (--split-file), not the default ones
        taken.append("split_file")
    if not args.data:
        recorded = run.get("data")
        if recorded:
            if not os.path.isdir(recorded):
                raise UserError(f"the data folder recorded in checkpoint {loaded.path}, {recorded}, does not exist "
                                f"(moved, or another machine); pass --data DIR, the folder that holds "
                                f"{args.dataset}/")
            args.data = recorded
            taken.append("data")
        else:
            args.data = os.path.join(REPO_ROOT, "data")
    return taken


def split_of(args, config):
    ds = SceneDataset(args.data, args.dataset, args.split, image_extension(args.dataset, args.imgEXT),
                      bands=config.get("in_channels", 3), split_file=getattr(args, "split_file", None))
    if args.skip_bad_images:
        bad = remove_unreadable([ds])
        if bad:
            print(f"skipped {len(bad)} unreadable image(s) of the {args.split} split, e.g. {bad[0]}")
    if len(ds.classes) != config["num_classes"]:
        raise UserError(f"{args.dataset} has {len(ds.classes)} classes but the checkpoint was trained on "
                        f"{config['num_classes']}; pass the dataset it was trained on")
    return ds


def query_label(path, index):
    """The class of a query image inside a class folder of the indexed dataset, else None."""
    if not index.classes or len(index) == 0:
        return None
    class_dir = os.path.dirname(os.path.abspath(path))
    dataset_name = os.path.basename(os.path.dirname(os.path.dirname(index.paths[0])))
    if os.path.basename(os.path.dirname(class_dir)) != dataset_name:
        return None
    name = os.path.basename(class_dir)
    return name if name in index.classes else None


def say(*args, **kwargs):
    if dist.is_main():
        print(*args, **kwargs)


# ----------------------------------------------------------------------------- commands

def cmd_index(args, device):
    if args.append and args.overwrite:
        raise UserError("--append adds to the index at --out and --overwrite replaces it; pass one of them")
    if args.allow_duplicates and not args.append:
        raise UserError("--allow-duplicates is for --append (images the index already holds); add --append or "
                        "leave it out")
    check_index_out(args.out, args.append, args.overwrite)
    replaced = existing(args.out) if args.overwrite and os.path.lexists(args.out) else None
    loaded = Loaded(args.checkpoint, device)
    if args.folder:
        paths, labels, classes = list_folder(args.folder), None, None
    else:
        taken = resolve_dataset_flags(args, loaded)
        if taken:
            say(f"from the checkpoint's flags: {describe(args, taken)}")
        ds = split_of(args, loaded.config)
        paths, labels, classes = [p for p, _ in ds.samples], ds.labels.numpy(), ds.classes
    appending = args.append and os.path.exists(args.out)
    total = write_index(args.out, loaded, args.checkpoint, paths, labels, classes, device, args.batch_size,
                        args.num_workers, append=args.append, allow_duplicates=args.allow_duplicates)
    what = f"the {args.split} split of {args.dataset}" if not args.folder else args.folder
    verb = f"appended {len(paths)} images of {what} to" if appending else f"indexed {len(paths)} images of {what} into"
    also = f"; it replaced {replaced.replace('an existing', 'the', 1)} that was there" if replaced else ""
    say(f"{verb} {args.out} ({total} images, {loaded.config['dim']}-bit codes){also}")


def describe(args, taken):
    return ", ".join(f"--{k} {getattr(args, k)}" for k in taken)


def engine_of(args, index, keep=True):
    """The BinaryIndex a query searches: the index's own (exact), or an approximate one over its codes
    (keep=False: a structure built is not kept in the index folder, for `serve`)."""
    given = {flag: getattr(args, flag) for flags in ENGINE_FLAGS.values() for flag in flags
             if getattr(args, flag) is not None}
    wrong = [flag for flag in given if flag not in ENGINE_FLAGS.get(args.engine, ())]
    if wrong:
        owner = next(name for name, flags in ENGINE_FLAGS.items() if wrong[0] in flags)
        raise UserError(f"--{wrong[0]} is a parameter of --engine {owner}, not of --engine {args.engine}")
    if args.engine == "exact":
        if args.rebuild_engine:
            raise UserError("--rebuild-engine is for an approximate --engine (ivf, hnsw); the exact engine "
                            "builds nothing")
        return index.search
    if args.rebuild_engine and args.engine not in BUILD_FLAGS:
        raise UserError(f"--rebuild-engine is for ivf and hnsw, whose structure an index folder keeps; "
                        f"{args.engine} builds its tables at every query")
    search = BinaryIndex.from_packed(index.search.bits, index.search.codes, args.engine, **given)
    if os.path.isdir(index.path):  # an index folder keeps the structure for the next query
        attach(search, index.path, index.header, given, rebuild=args.rebuild_engine, keep_built=keep)
    return search


def cmd_query(args, device):
    for flag in ("json", "grid"):
        if getattr(args, flag) not in (None, "-"):
            check_writable(getattr(args, flag), f"--{flag}")
    index = load_index(args.index)
    ckpt_path = args.checkpoint or index.get("checkpoint")
    if not args.checkpoint and not os.path.isfile(ckpt_path):
        raise UserError(f"checkpoint {ckpt_path} does not exist; this path came from index {args.index} (the "
                        f"checkpoint that built it; was its run folder moved?): pass --checkpoint PATH to use "
                        f"another copy of it")
    loaded = Loaded(ckpt_path, device)
    config = loaded.config
    check_compatible(index.config, config, args.index, ckpt_path)
    check_weights(index, loaded, args.index)
    for path in args.images:
        if not os.path.isfile(path):
            raise UserError(f"query image {path} does not exist")
    search = engine_of(args, index)
    codes = encode_files(loaded.model, config, args.images, None, device, args.batch_size, 0)
    # One more than asked for, in case the query itself is in the database and is left out.
    dist_k, idx_k = search.search(codes, args.topk + int(args.exclude_self))

    queries = []
    for qi, path in enumerate(args.images):
        own = os.path.abspath(path)
        label = query_label(path, index)
        results = []
        for d, j in zip(dist_k[qi].tolist(), idx_k[qi].tolist()):
            if j < 0 or (args.exclude_self and index.paths[j] == own):
                continue
            result_label = index.label_name(j)
            relevant = None if label is None or result_label is None else result_label == label
            results.append({"rank": len(results) + 1, "distance": int(d), "path": index.paths[j],
                            "label": result_label, "relevant": relevant})
        queries.append({"path": own, "label": label, "results": results[:args.topk]})
    report_query(args, index, ckpt_path, queries, config, search)


def report_query(args, index, ckpt_path, queries, config, search):
    # With --json - the ranking goes to stdout for programs, and the table to stderr for people.
    out = sys.stderr if args.json == "-" else sys.stdout
    engine = "" if args.engine == "exact" else f", approximate engine {args.engine} ({engine_params(search)})"
    print(f"index {os.path.abspath(args.index)}: {len(index)} database images, {index.config['dim']} bits, "
          f"checkpoint {os.path.abspath(ckpt_path)}{engine}", file=out)
    for q in queries:
        print(f"query {q['path']}  class {q['label'] if q['label'] is not None else '(unknown)'}", file=out)
        for r in q["results"]:
            mark = "" if r["relevant"] is None else ("  relevant" if r["relevant"] else "  irrelevant")
            cls = f"  {r['label']}" if r["label"] is not None else ""
            print(f"  {r['rank']:3d}  d={r['distance']:3d}  {r['path']}{cls}{mark}", file=out)
    if args.json:
        ranking = {"index": os.path.abspath(args.index), "checkpoint": os.path.abspath(ckpt_path),
                   "bits": index.config["dim"], "engine": args.engine, "engine_params": search.params,
                   "queries": queries}
        if args.json == "-":
            json.dump(ranking, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            with open(args.json, "w") as fh:
                json.dump(ranking, fh, indent=2)
            print(f"ranking written to {args.json}", file=out)
    if args.grid:
        relevant = None
        if all(q["label"] is not None for q in queries) and index.labels is not None:
            relevant = [[r["relevant"] for r in q["results"]] for q in queries]
        grid = retrieval_grid([q["path"] for q in queries], [[r["path"] for r in q["results"]] for q in queries],
                              relevant, [[r["distance"] for r in q["results"]] for q in queries],
                              bands=config.get("in_channels", 3))
        grid.save(args.grid)
        print(f"grid written to {args.grid}", file=out)


def cmd_evaluate(args, device):
    if args.json:
        check_writable(args.json, "--json")
    loaded = Loaded(args.checkpoint, device)
    model, config = loaded.model, loaded.config
    taken = resolve_dataset_flags(args, loaded)
    if taken:
        print(f"from the checkpoint's flags: {describe(args, taken)}")
    db = split_of(argparse_namespace(args, split="train"), config)
    queries = split_of(args, config)
    db_codes = encode_files(model, config, [p for p, _ in db.samples], db.labels, device, args.batch_size,
                            args.num_workers)
    q_codes = encode_files(model, config, [p for p, _ in queries.samples], queries.labels, device,
                           args.batch_size, args.num_workers)
    both = every_metric_by_ties(q_codes, queries.labels.to(device), db_codes, db.labels.to(device), args.topk)
    metrics, tie_aware = both["index"], both["expected"]
    print(f"{args.dataset} {args.split} queries ({len(queries)}) against the train split ({len(db)}), "
          f"{config['dim']} bits")
    # Ties at equal Hamming distance broken by database index, and the expectation over their orders
    # (docs/method.md section 6); P@H<=r does not depend on the order, so both columns agree there.
    print(f"  {'':10s} {'index':>7s} {'tie-aware':>9s}")
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"  {k:10s} {v:7.4f} {tie_aware[k]:9.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"checkpoint": os.path.abspath(args.checkpoint), "dataset": args.dataset,
                       "data": os.path.abspath(args.data), "split": args.split, "metrics": metrics,
                       "metrics_tie_aware": tie_aware}, fh, indent=2)
        print(f"metrics written to {args.json}")


def cmd_serve(args, device):
    try:
        from utils.retrieval.serve import serve  # noqa: PLC0415 - only `serve` needs the web stack
    except ImportError as err:
        raise UserError(f"serve needs FastAPI, uvicorn and python-multipart ({err}); install them with "
                        f"`.venv/bin/pip install -r requirements.txt`") from None
    return serve(args, device, lambda a, index: engine_of(a, index, keep=False))


def argparse_namespace(args, **changes):
    return type(args)(**{**vars(args), **changes})


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "topk", 1) <= 0 or args.batch_size <= 0:
        raise UserError("--topk and --batch-size must be positive")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and args.command != "index":
        raise UserError(f"only `index` shares its work between processes; run `{args.command}` without torchrun")
    device = select_device(args.device)
    if several:
        dist.init(device.type)
    try:
        commands = {"index": cmd_index, "query": cmd_query, "evaluate": cmd_evaluate, "serve": cmd_serve}
        commands[args.command](args, device)
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
