"""Generated class-dependent images and the photos scikit-image ships (kept here for tests; the implementation
lives in :mod:`robustfm.data.demo_images`, which the library's demo data set uses)."""

from robustfm.data.demo_images import (
    COLORS,
    PHOTOS,
    SHAPES,
    class_name,
    class_style,
    draw_shape,
    generated_image,
    generated_image_and_mask,
    gradient_background,
    horse_image_and_mask,
    real_photos,
    save_image,
    save_mask,
    square_crop,
)

__all__ = [
    "COLORS",
    "PHOTOS",
    "SHAPES",
    "class_name",
    "class_style",
    "draw_shape",
    "generated_image",
    "generated_image_and_mask",
    "gradient_background",
    "horse_image_and_mask",
    "real_photos",
    "save_image",
    "save_mask",
    "square_crop",
]
