"""The vocabulary of validation: every check by its stable name, and one check's result."""

from __future__ import annotations

from dataclasses import dataclass

# Every check, in report order; the names are stable (tests, reports and alerts rely on them).
CHECKS = {
    "manifest": "the manifest exists and parses",
    "columns.required": "columns id, image, text and label exist",
    "types.id": "id values are strings",
    "types.image": "image values are strings",
    "types.text": "text values are strings",
    "types.label": "label values are strings",
    "types.split": "split values are strings",
    "types.group": "group values are strings",
    "id.not_null": "every row has an id",
    "id.non_empty": "ids are non-empty",
    "id.unique": "ids are unique",
    "label.not_null": "every row has a label",
    "label.in_set": "labels belong to validate.labels",
    "split.in_set": "split is train, val or test",
    "text.not_blank": "texts are not blank",
    "text.length": "text length is within validate.text_min_chars..text_max_chars",
    "text.missing_rate": "share of rows without text is at most data.max_missing_text_rate",
    "image.missing_rate": "share of rows without image is at most data.max_missing_image_rate",
    "image.path_relative": "image paths are relative, without '..'",
    "image.extension": "image paths end in .png, .jpg or .jpeg",
    "image.inside_dataset": "image files resolve inside the dataset directory",
    "image.exists": "image files exist",
    "image.file_size": "image files are at most validate.image.max_file_mb",
    "image.format": "image files are PNG or JPEG by content",
    "image.dimensions": "image sizes are within validate.image limits",
    "image.decodes": "image files decode completely",
    "classes.min_examples": "each class has at least validate.min_examples_per_class examples",
    "classes.in_train": "each class appears in the train split",
    "classes.balance": "largest / smallest class count is at most validate.max_class_imbalance",
    "splits.min_size": "each split has at least validate.min_split_size examples",
    "splits.leakage": "no (image content, text) pair appears in more than one split",
}


_MAX_LISTED = 20
# A line for a terminal stays one: a 5000-character label or id is shown by its start.
_MAX_DETAIL = 1000
_MAX_ITEM = 100


@dataclass(frozen=True)
class CheckResult:
    name: str
    success: bool
    detail: str = ""
    ids: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    source: str = "mmops"

    @property
    def description(self) -> str:
        return CHECKS[self.name]

    def summary(self) -> str:
        """One line for a terminal: the detail plus the first offending ids and files."""
        parts = [_shorten(self.detail, _MAX_DETAIL)] if self.detail else []
        for label, items in (("ids", self.ids), ("files", self.files)):
            if items:
                shown = ", ".join(_shorten(item, _MAX_ITEM) for item in items[:_MAX_LISTED])
                more = (
                    f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
                )
                parts.append(f"{label}: {shown}{more}")
        return "; ".join(parts)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
