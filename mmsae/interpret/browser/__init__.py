"""Feature browser: a static HTML site over one SAE's features that opens from disk (file://).

Layout of a browser artifact folder (every link relative, no server, no external JS / CSS):

    index.html           the listed features, sortable by clicking a column header or by the URL hash
                         (index.html#sort=density&dir=desc; keys: feature, class, weight, density,
                         density_text, density_image, max_act; missing values sort last either way)
    features/{f}.html    one page per listed feature: top images with a per-patch heat map, top text
                         contexts with the activating tokens highlighted, activation histogram
    img/{s}.png          one image per shown sample (index s among the token index's samples): the
                         square the vision tower sees (centre crop), resized to `image_size` px
    heat/{f}_{s}.png     the feature's per-patch activation on that image as a veil, one pixel per patch
                         (RGBA, dark, alpha = 1 - activation / the feature's top image activation, so
                         active patches stay bright and no overlay colour mixes with the image's own),
                         stretched over the image by CSS (`image-rendering: pixelated`)
    hist/{f}.png         activation histogram per modality (matplotlib)

Which features are listed (`n_features`, `per_class`): the `per_class` densest features of each live
class, then cross-modal features by weight, then the rest by density, up to `n_features`. Dead
features are never listed. Density = firing frequency: active tokens / tokens of that modality
(`density` over all tokens).

Patch grid: from the model's adapter (`ModelAdapter.image_grid`: patch `first + r * cols + c` is cell
(r, c)), loaded from its config and processor only (no weights). Where the grid is not fixed (Qwen2-VL)
images are shown without a heat map. For LLaVA-NeXT only the base grid (the first rows x cols image
tokens) is drawn; the base tile is the whole image resized, so on a non-square image the centre-crop
view is an approximation.

Every piece of data-set text (questions, token strings, sample ids) goes through `esc`; the page
script only reorders existing rows and never writes markup.

Modules: `data` (the model's tokenizer and grid, feature selection, the token index, the codes scan,
text contexts), `images` (image squares, heat veils, histograms), `pages` (HTML), `site` (build_site).
"""

from mmsae.interpret.browser.data import (
    feature_stats,
    model_view,
    read_features,
    read_tokens,
    scan_codes,
    select_features,
    token_strings,
)
from mmsae.interpret.browser.images import patch_heat
from mmsae.interpret.browser.pages import write_redirect
from mmsae.interpret.browser.site import build_site

__all__ = ["build_site", "feature_stats", "model_view", "patch_heat", "read_features", "read_tokens", "scan_codes",
           "select_features", "token_strings", "write_redirect"]
