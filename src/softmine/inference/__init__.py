"""Put a trained model to work: load it, embed images, index and search them, export the network.

    from softmine.inference import load_model, embed_images, list_images, EmbeddingIndex

    loaded = load_model("outputs/2026-12-01/12-00-00")        # run folder or .pt checkpoint
    result = embed_images(loaded, list_images("photos/"))     # the run's own test transform
    index = EmbeddingIndex.build(result.embeddings, "hnsw")    # faiss, cosine similarity
    index.save("photos.index")
    hits = index.search(result.embeddings.vectors[:1], k=10)  # [[Hit(rank, item, path, score, label), ...]]

The command-line tools ``softmine-embed``, ``softmine-index`` and ``softmine-export``
are thin layers over these functions.
"""

from softmine.inference.embeddings import Embeddings, load_embeddings, save_embeddings
from softmine.inference.extract import EmbedResult, embed_batch, embed_images, embed_split
from softmine.inference.image_files import (
    ImageList,
    collect_images,
    list_images,
    read_image_list,
)
from softmine.inference.model import LoadedModel, find_checkpoint, load_model
from softmine.inference.model_export import ExportReport, export_model
from softmine.inference.search_index import EmbeddingIndex, Hit

__all__ = [
    "EmbedResult",
    "EmbeddingIndex",
    "Embeddings",
    "ExportReport",
    "Hit",
    "ImageList",
    "LoadedModel",
    "collect_images",
    "embed_batch",
    "embed_images",
    "embed_split",
    "export_model",
    "find_checkpoint",
    "list_images",
    "load_embeddings",
    "load_model",
    "read_image_list",
    "save_embeddings",
]
