"""codetr.analysis: training curves (metrics_plot) and the discriminability analysis of Co-DETR (discriminability)."""
