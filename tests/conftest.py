import pytest
import torch
from PIL import Image

from fcmae.data import demo_photo_paths


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def labeled_folder(tmp_path_factory):
    """train/ and val/ splits; each class is random crops of one photo."""
    root = tmp_path_factory.mktemp("labeled")
    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(["astronaut.png", "coffee.png"]):
        with Image.open(demo_photo_paths([name])[0]) as photo:
            rgb = photo.convert("RGB").resize((160, 160))
        for split, count in (("train", 6), ("val", 4)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                x, y = torch.randint(0, 80, (2,), generator=generator).tolist()
                rgb.crop((x, y, x + 80, y + 80)).save(folder / f"{index}.png")
    return root
