"""
The pretraining corpus on disk: getting the parquet shards into <base>/base_data/ and reading them back.

`python -m nanochat.dataset -n 8` downloads FineWeb-Edu shards (karpathy's shuffled 100B-token repackaging: 1,823
shards of ~100 MB, row groups of 1,024 documents); `--embedded` copies the small corpus shipped in data/embedded/
(offline, ~9 MB). Every shard is a parquet file with a `text` column, one document per row.

The validation split is PINNED to one file name, `shard_01822.parquet` (VAL_FILENAME, the last FineWeb-Edu shard),
whatever else is there: the downloader always fetches it besides the N training shards, and --embedded installs its
own validation shard under that name (with the marker file EMBEDDED.txt, so the two corpora are never mixed).
Not a tokenizer or a batcher: nanochat/dataloader.py turns the documents into batches.
"""

import argparse
import os
import shutil
import sys
from multiprocessing.pool import ThreadPool

import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import MissingFileError, UserError, download_file, get_base_dir

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # shard ids are 0..1822
VAL_SHARD = MAX_SHARD  # pinned: the validation split is this one shard, whatever else is downloaded
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "embedded")
EMBEDDED_VAL_SOURCE = "shard_00006.parquet"  # the embedded corpus's validation shard, installed as VAL_FILENAME
EMBEDDED_MARKER = "EMBEDDED.txt"


class MixedCorporaError(UserError, RuntimeError):
    """base_data/ already holds the other corpus; still a RuntimeError for callers that catch that."""


HOW_TO_GET_DATA = ("run `python -m nanochat.dataset -n 8` (FineWeb-Edu, needs the network) or "
                   "`python -m nanochat.dataset --embedded` (the small corpus shipped with the repo, offline)")


def get_data_dir():
    return os.path.join(get_base_dir(), "base_data")


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def validate_shard(path):
    """Raise UserError (a ValueError) unless path is a parquet file with a `text` column and at least one row; return its
    number of row groups. A truncated download or an HTML error page fails here (no parquet footer)."""
    try:
        with pq.ParquetFile(path) as pf:
            columns, num_rows, num_row_groups = pf.schema_arrow.names, pf.metadata.num_rows, pf.num_row_groups
    except Exception as e:
        raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    if "text" not in columns:
        raise UserError(f"{path} has no 'text' column (its columns: {columns}); every shard needs one document per row in 'text'")
    if num_rows == 0:
        raise UserError(f"{path} is an empty shard (0 rows); delete it and re-create it ({HOW_TO_GET_DATA})")
    return num_row_groups


def list_parquet_files(data_dir=None, split=None):
    """Sorted paths of the shards in data_dir (default <base>/base_data): all of them (split=None), the
    validation shard alone (split="val"), or all the others (split="train")."""
    data_dir = data_dir or get_data_dir()
    names = sorted(name for name in os.listdir(data_dir) if name.endswith(".parquet")) if os.path.isdir(data_dir) else []
    if not names:
        raise MissingFileError(f"no parquet shards in {data_dir}: {HOW_TO_GET_DATA}")
    if split is None:
        chosen = names
    elif split == "val":
        chosen = [name for name in names if name == VAL_FILENAME]
        if not chosen:
            raise MissingFileError(f"no validation shard in {data_dir}: the validation split is the file {VAL_FILENAME}, "
                                   f"which is missing (found {len(names)} other shards); {HOW_TO_GET_DATA}")
    elif split == "train":
        chosen = [name for name in names if name != VAL_FILENAME]
        if not chosen:
            raise MissingFileError(f"no training shards in {data_dir}: only the validation shard {VAL_FILENAME} is there; {HOW_TO_GET_DATA}")
    else:
        raise UserError(f"split={split!r}; expected 'train' or 'val'")
    return [os.path.join(data_dir, name) for name in chosen]


def list_row_groups(split, data_dir=None):
    """[(path, row_group_index)] over every shard of the split, in order. Row groups are the unit of
    parallelism: rank r of W reads entries r, r+W, r+2W, ... of this list."""
    row_groups = []
    for path in list_parquet_files(data_dir, split):
        row_groups += [(path, rg) for rg in range(validate_shard(path))]
    return row_groups


def read_row_group(path, row_group):
    """The documents (str) of one row group."""
    with pq.ParquetFile(path) as pf:
        return pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """One pass over the split, yielding the documents of one row group at a time: row groups start,
    start+step, ... (ranks pass start=rank, step=world_size to read disjoint parts)."""
    for path, row_group in list_row_groups(split, data_dir)[start::step]:
        yield read_row_group(path, row_group)


# -----------------------------------------------------------------------------
# Filling base_data/


def download_shards(num_files, num_workers=4, base_url=None, data_dir=None, attempts=5, backoff=1.0):
    """Download training shards 0..num_files-1 (all when -1) and the validation shard into data_dir.
    Shards already present and valid are kept; invalid ones are downloaded again. Raises RuntimeError
    naming every shard that could not be downloaded. Returns the paths of all requested shards."""
    base_url = (base_url or os.environ.get("NANOCHAT_DATA_URL") or BASE_URL).rstrip("/")
    data_dir = data_dir or get_data_dir()
    num_train = MAX_SHARD if num_files == -1 else num_files  # training shards are 0..MAX_SHARD-1
    if not 0 <= num_train <= MAX_SHARD:
        raise UserError(f"num_files={num_files}: expected 0..{MAX_SHARD} training shards, or -1 for all of them")
    os.makedirs(data_dir, exist_ok=True)
    if os.path.exists(os.path.join(data_dir, EMBEDDED_MARKER)):
        raise MixedCorporaError(f"{data_dir} holds the embedded corpus ({EMBEDDED_MARKER}); downloading FineWeb-Edu there would mix the "
                                f"two. Delete {data_dir} or point NANOCHAT_BASE_DIR somewhere else first.")
    indices = list(range(num_train)) + [VAL_SHARD]
    paths = [os.path.join(data_dir, shard_filename(i)) for i in indices]

    todo = []
    for index, path in zip(indices, paths):
        if os.path.exists(path):
            try:
                validate_shard(path)
                continue  # present and valid: keep it
            except ValueError as e:
                print(f"re-downloading an invalid shard: {e}")
                os.remove(path)  # never leave a broken shard behind, even if the new download fails
        todo.append(index)
    print(f"{len(indices) - len(todo)} of {len(indices)} shards already present in {data_dir}; downloading {len(todo)} from {base_url}")

    def fetch(index):
        name = shard_filename(index)
        try:
            download_file(f"{base_url}/{name}", os.path.join(data_dir, name), attempts=attempts, backoff=backoff,
                          validate=validate_shard, desc=name)
            return None
        except Exception as e:
            return f"{name}: {e}"

    with ThreadPool(max(1, min(num_workers, len(todo) or 1))) as pool:
        failures = [error for error in tqdm(pool.imap_unordered(fetch, todo), total=len(todo), unit="shard", desc="shards") if error]
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(todo)} shard downloads failed:\n  " + "\n  ".join(sorted(failures)))
    return paths


def install_embedded(data_dir=None):
    """Copy the corpus in data/embedded/ into data_dir, its validation shard under the pinned name."""
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    marker = os.path.join(data_dir, EMBEDDED_MARKER)
    existing = [name for name in os.listdir(data_dir) if name.endswith(".parquet")]
    if existing and not os.path.exists(marker):
        raise MixedCorporaError(f"{data_dir} already holds {len(existing)} shards that are not the embedded corpus; installing it there "
                                f"would mix the two. Delete {data_dir} or point NANOCHAT_BASE_DIR somewhere else first.")
    sources = sorted(name for name in os.listdir(EMBEDDED_DIR) if name.endswith(".parquet"))
    for name in sources:
        target = os.path.join(data_dir, VAL_FILENAME if name == EMBEDDED_VAL_SOURCE else name)
        shutil.copyfile(os.path.join(EMBEDDED_DIR, name), target + ".tmp")
        os.replace(target + ".tmp", target)  # atomic: a shard is either absent or complete
    with open(marker, "w", encoding="utf-8") as f:
        f.write(f"This directory holds nanochat's embedded corpus (see data/embedded/README.md in the repo): "
                f"{EMBEDDED_VAL_SOURCE} is installed as the validation shard {VAL_FILENAME}.\n")
    print(f"Installed the embedded corpus ({len(sources)} shards, validation = {VAL_FILENAME}) into {data_dir}")
    return list_parquet_files(data_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu shards (always plus the pinned validation shard "
                                     f"{VAL_FILENAME}) or install the embedded corpus into <base>/base_data/.")
    parser.add_argument("-n", "--num_files", type=int, default=-1, help=f"training shards to download (0..{MAX_SHARD}, -1 = all)")
    parser.add_argument("-w", "--num_workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base_url", default=None, help=f"where shard_XXXXX.parquet live (default: $NANOCHAT_DATA_URL or {BASE_URL})")
    parser.add_argument("--embedded", action="store_true", help="install the corpus shipped in data/embedded/ instead (offline)")
    args = parser.parse_args(argv)
    try:
        if args.embedded:
            install_embedded()
        else:
            paths = download_shards(args.num_files, args.num_workers, args.base_url)
            print(f"{len(paths)} shards ready in {get_data_dir()} (validation: {VAL_FILENAME})")
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
