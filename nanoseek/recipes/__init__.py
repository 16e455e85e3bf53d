"""Training recipes, one per pipeline stage; each reads top to bottom: args -> setup -> loop -> save."""
