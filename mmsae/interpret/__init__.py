"""Interpretation tools over a trained SAE: the feature browser (`browser`), automatic explanations and
their IoU score (`explain`), feature steering (`steering`), attribution of a logit difference to
(token, feature) (`attribution`), image-patch filtering (`patches`); `common` holds what the steer and
attribute command lines share."""
