"""CNN architectures that keras.applications does not have, built from Keras layers, and readers for
the weight files they are published in."""
