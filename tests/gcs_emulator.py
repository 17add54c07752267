"""gcp-storage-emulator, started as `python tests/gcs_emulator.py start --port=…`, speaking one header
more: real GCS answers an object download with its generation (`x-goog-generation`), which
tensorstore's OCDBT driver (orbax's checkpoint arrays) reads before each conditional write; the
emulator (2026.7.19) leaves it out, and orbax's second array write to the same step then fails with
"Malformed StorageGeneration"."""

import sys

import gcp_storage_emulator.handlers.objects as objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001: not found; the emulator has answered 404 already
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download  # before the server module builds its routes from it

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main

  main(sys.argv[1:])
