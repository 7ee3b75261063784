"""A GCS-compatible server on 127.0.0.1 for tests: `python -m tests.gcs_server PORT BUCKET`.

It is gcp-storage-emulator (in memory, with BUCKET created), completed where tensorstore (Orbax's
array writer) needs what real GCS does and the emulator does not: object data comes with its
`x-goog-generation` header, and the generation preconditions of reads and writes are honoured
(304 / 412), which tensorstore's OCDBT uses for its manifest.
"""

import logging
import sys
from http import HTTPStatus

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _query(request, name):
    values = request.query.get(name)
    return values[0] if values else None


def _generation(storage, bucket: str, name: str) -> str:
    """The live object's generation, "0" when there is none (GCS's convention)."""
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def with_read_conditions(download):
    def handler(request, response, storage, *args, **kwargs):
        generation = _generation(storage, request.params["bucket_name"],
                                 request.params["object_id"])
        if (match := _query(request, "ifGenerationMatch")) is not None and match != generation:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        if _query(request, "ifGenerationNotMatch") == generation != "0":
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        if generation != "0":
            response["x-goog-generation"] = generation
        return download(request, response, storage, *args, **kwargs)

    return handler


def with_write_condition(insert):
    def handler(request, response, storage, *args, **kwargs):
        match = _query(request, "ifGenerationMatch")
        name = _query(request, "name")
        bucket = request.params["bucket_name"]
        if match is not None and name is not None and match != _generation(storage, bucket, name):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        return insert(request, response, storage, *args, **kwargs)

    return handler


def patch_handlers() -> None:
    download = with_read_conditions(objects.download)
    insert = with_write_condition(objects.insert)
    replacements = {objects.download: download, objects.insert: insert}
    for _, handlers in emulator.HANDLERS:
        for method, handler in handlers.items():
            handlers[method] = replacements.get(handler, handler)
    objects.download = download  # `objects.get` (?alt=media) calls it by this name.
    objects.insert = insert  # The router's fallback for uploads without the /upload prefix.


def main(port: int, bucket: str) -> None:
    logging.basicConfig(level=logging.CRITICAL)  # It logs every missing object as an error.
    patch_handlers()
    emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
