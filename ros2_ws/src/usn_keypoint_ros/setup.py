import os

from setuptools import setup

LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "launch")

package_name = "usn_keypoint_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=[package_name],
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        # The launch sources live in the repository's top-level launch/ folder.
        ("share/" + package_name + "/launch", [os.path.relpath(os.path.join(LAUNCH, f))
                                               for f in sorted(os.listdir(LAUNCH))
                                               if f.endswith((".launch.py", ".yaml", ".xml"))]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="USN keypoints maintainers",
    maintainer_email="maintainers@usn-keypoints.invalid",
    description="Certified keypoint detection node",
    license="Apache-2.0",
    entry_points={"console_scripts": ["keypoint_node = usn_keypoint_ros.node:main"]},
)
