from django.urls import path

from . import views

urlpatterns = [
    path("", views.index),
    path("<slug:room>/", views.index),
    path("<slug:room>/announce/", views.announce),
]
