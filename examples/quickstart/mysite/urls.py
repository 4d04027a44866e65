from django.contrib import admin
from django.urls import path

from . import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("rooms/<slug:room_name>/", views.room),
    path("rooms/<slug:room_name>/history/", views.history),
    path("rooms/<slug:room_name>/announce/", views.announce),
]
