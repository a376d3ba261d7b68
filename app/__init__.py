"""LODS Studio's web app: the Gradio page (ui), the one-job manager (jobs), input rules (config), plot data
(plots) and the hook to the live 3D viewer (viewer_link). ``python app.py`` starts it."""
